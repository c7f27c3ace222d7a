# SPDX-License-Identifier: MIT
# The user guide's "Metrics" section (docs/user-guide.md; the README links to it) explains every
# counter: each name that for_each_counter() visits (include/vramguard/stats.hpp for Stats,
# registry_events.hpp for RegistryStats) must appear in that section as `name`. A new counter
# without its line in the guide fails here.
#
#   cmake -DSOURCE_DIR=<repo root> -P tests/prometheus/readme_counters.cmake
cmake_minimum_required(VERSION 3.16)

set(guide "docs/user-guide.md")
file(READ "${SOURCE_DIR}/${guide}" guide_text)
string(FIND "${guide_text}" "\n## Metrics\n" begin)
if(begin EQUAL -1)
    message(FATAL_ERROR "${guide} has no '## Metrics' section")
endif()
math(EXPR begin "${begin} + 1")
string(SUBSTRING "${guide_text}" ${begin} -1 section)
string(FIND "${section}" "\n## " end)
string(SUBSTRING "${section}" 0 ${end} section)

set(missing "")
set(count 0)
foreach(header stats.hpp registry_events.hpp)
    file(READ "${SOURCE_DIR}/include/vramguard/${header}" text)
    string(REGEX MATCHALL "visit\\(\"[a-z0-9_]+\"" visits "${text}")
    foreach(visit IN LISTS visits)
        string(REGEX REPLACE "visit\\(\"([a-z0-9_]+)\"" "\\1" name "${visit}")
        math(EXPR count "${count} + 1")
        string(FIND "${section}" "`${name}`" at)
        if(at EQUAL -1)
            list(APPEND missing "${name} (${header})")
        endif()
    endforeach()
endforeach()
if(count LESS 20)
    message(FATAL_ERROR "found only ${count} counters in stats.hpp and registry_events.hpp: the pattern "
                        "visit(\"name\", ...) no longer matches for_each_counter()")
endif()
if(missing)
    string(REPLACE ";" ", " missing "${missing}")
    message(FATAL_ERROR "${guide}'s Metrics section does not explain: ${missing}")
endif()
message(STATUS "${guide}'s Metrics section explains all ${count} counters")
