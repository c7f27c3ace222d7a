# SPDX-License-Identifier: MIT
# The README shows the spdlog adapter; this checks it shows the one that is compiled and tested:
# the text between the two "// [README: spdlog adapter]" lines of examples/spdlog_sink.hpp must
# appear in README.md verbatim.
#
#   cmake -DSOURCE_DIR=<repo root> -P tests/spdlog/readme_snippet.cmake
cmake_minimum_required(VERSION 3.16)

set(marker "// [README: spdlog adapter]\n")
file(READ "${SOURCE_DIR}/examples/spdlog_sink.hpp" header)
file(READ "${SOURCE_DIR}/README.md" readme)
string(REPLACE "\r\n" "\n" header "${header}")
string(REPLACE "\r\n" "\n" readme "${readme}")

string(FIND "${header}" "${marker}" begin)
string(FIND "${header}" "${marker}" end REVERSE)
if(begin EQUAL -1 OR end EQUAL begin)
    message(FATAL_ERROR "examples/spdlog_sink.hpp: expected two '${marker}' lines around the adapter")
endif()
string(LENGTH "${marker}" marker_length)
math(EXPR begin "${begin} + ${marker_length}")
math(EXPR length "${end} - ${begin}")
string(SUBSTRING "${header}" ${begin} ${length} snippet)

string(FIND "${readme}" "${snippet}" found)
if(found EQUAL -1)
    message(FATAL_ERROR "README.md does not show the spdlog adapter of examples/spdlog_sink.hpp "
                        "verbatim; copy this into it:\n${snippet}")
endif()
message(STATUS "README.md shows the spdlog adapter that examples/spdlog_sink.hpp compiles")
