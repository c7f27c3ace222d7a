# SPDX-License-Identifier: MIT
# pkg-config against the installed prefix: the flags it prints must be enough to compile and
# link a program that uses vramguard.
set(ENV{PKG_CONFIG_PATH} "${PC_DIR}")
set(ENV{PKG_CONFIG_LIBDIR} "${PC_DIR}")
execute_process(COMMAND "${PKG_CONFIG}" --cflags vramguard
                OUTPUT_VARIABLE cflags ERROR_VARIABLE error RESULT_VARIABLE rc
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --cflags vramguard failed: ${error}")
endif()
execute_process(COMMAND "${PKG_CONFIG}" --libs vramguard
                OUTPUT_VARIABLE libs ERROR_VARIABLE error RESULT_VARIABLE rc
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --libs vramguard failed: ${error}")
endif()
message(STATUS "pkg-config --cflags vramguard: ${cflags}")
message(STATUS "pkg-config --libs vramguard: ${libs}")

separate_arguments(cflags UNIX_COMMAND "${cflags}")
separate_arguments(libs UNIX_COMMAND "${libs}")
# The include directory pkg-config names must be the installed one.
set(found_include OFF)
foreach(flag IN LISTS cflags)
    if(flag MATCHES "^-I(.+)$")
        get_filename_component(dir "${CMAKE_MATCH_1}" REALPATH)
        get_filename_component(prefix "${PREFIX}" REALPATH)
        if(dir STREQUAL "${prefix}/include" AND EXISTS "${dir}/vramguard/vramguard.hpp")
            set(found_include ON)
        endif()
    endif()
endforeach()
if(NOT found_include)
    message(FATAL_ERROR "pkg-config --cflags vramguard does not name ${PREFIX}/include: ${cflags}")
endif()

file(MAKE_DIRECTORY "${WORK_DIR}")
set(exe "${WORK_DIR}/vramguard_consumer")
execute_process(COMMAND "${CXX}" -std=c++17 ${cflags} "${SOURCE}" -o "${exe}" ${libs}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "compiling with the pkg-config flags failed")
endif()
execute_process(COMMAND "${exe}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "the pkg-config consumer failed (${rc})")
endif()
