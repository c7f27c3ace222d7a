# SPDX-License-Identifier: MIT
# A README snippet is the code a test compiles: the lines between the two MARKER lines of FILE,
# with INDENT leading spaces taken off each (the snippet sits in a function body there), must
# appear in README.md verbatim.
#
#   cmake -DSOURCE_DIR=<repo root> -DFILE=<path from the root> -DMARKER=<text> [-DINDENT=4]
#         -P tests/readme/snippet.cmake
cmake_minimum_required(VERSION 3.16)

if(NOT DEFINED INDENT)
    set(INDENT 0)
endif()
file(READ "${SOURCE_DIR}/${FILE}" source)
file(READ "${SOURCE_DIR}/README.md" readme)
string(REPLACE "\r\n" "\n" source "${source}")
string(REPLACE "\r\n" "\n" readme "${readme}")

string(FIND "${source}" "${MARKER}\n" begin)
string(FIND "${source}" "${MARKER}\n" end REVERSE)
if(begin EQUAL -1 OR end EQUAL begin)
    message(FATAL_ERROR "${FILE}: expected two '${MARKER}' lines around the README snippet")
endif()
# From the start of the line after the first marker to the start of the second marker's line.
string(SUBSTRING "${source}" ${begin} -1 rest)
string(FIND "${rest}" "\n" newline)
math(EXPR begin "${begin} + ${newline} + 1")
string(SUBSTRING "${source}" 0 ${end} head)
string(FIND "${head}" "\n" end REVERSE)
math(EXPR end "${end} + 1")
math(EXPR length "${end} - ${begin}")
string(SUBSTRING "${source}" ${begin} ${length} snippet)
if(INDENT GREATER 0)
    string(REPEAT " " ${INDENT} spaces)
    string(REGEX REPLACE "(^|\n)${spaces}" "\\1" snippet "${snippet}")
endif()

string(FIND "${readme}" "${snippet}" found)
if(found EQUAL -1)
    message(FATAL_ERROR "README.md does not show the snippet '${MARKER}' of ${FILE} verbatim; "
                        "copy this into it:\n${snippet}")
endif()
message(STATUS "README.md shows the snippet '${MARKER}' that ${FILE} compiles")
