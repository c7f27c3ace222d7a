# SPDX-License-Identifier: MIT
# The single header: `cmake --build build --target vramguard_amalgamate` regenerates
# include/single/vramguard/vramguard.hpp in the source tree; the test single_header_up_to_date
# (tests/CMakeLists.txt) checks that the committed copy matches the split headers.
#
# The single-header test pass compiles against a copy generated in the build tree from the current
# split headers (target vramguard_single_fresh), so that editing a header without regenerating
# fails one clear test (single_header_up_to_date) rather than the build; when that test passes,
# the fresh copy and the committed one are the same bytes.
set(VRAMGUARD_AMALGAMATE_SCRIPT "${CMAKE_CURRENT_LIST_DIR}/amalgamate.cmake")
set(_vramguard_umbrella "${PROJECT_SOURCE_DIR}/include/vramguard/vramguard.hpp")

if(NOT TARGET vramguard_amalgamate)
    add_custom_target(vramguard_amalgamate
        COMMAND "${CMAKE_COMMAND}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
                "-DOUTPUT=${VRAMGUARD_SINGLE_HEADER}" -P "${VRAMGUARD_AMALGAMATE_SCRIPT}"
        COMMENT "Regenerating include/single/vramguard/vramguard.hpp"
        VERBATIM)
endif()

# Bootstrap: a checkout without the generated header (before it was first committed) gets one now,
# so that vramguard::single is usable; the up-to-date test still guards the committed copy.
if(VRAMGUARD_MAIN_PROJECT AND EXISTS "${_vramguard_umbrella}" AND NOT EXISTS "${VRAMGUARD_SINGLE_HEADER}")
    message(WARNING "vramguard: ${VRAMGUARD_SINGLE_HEADER} is missing; generating it now. Commit it.")
    execute_process(
        COMMAND "${CMAKE_COMMAND}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
                "-DOUTPUT=${VRAMGUARD_SINGLE_HEADER}" -P "${VRAMGUARD_AMALGAMATE_SCRIPT}"
        RESULT_VARIABLE _vramguard_amalgamate_rc)
    if(NOT _vramguard_amalgamate_rc EQUAL 0)
        message(WARNING "vramguard: generating the single header failed")
    endif()
endif()

if(VRAMGUARD_BUILD_TESTS)
    set(VRAMGUARD_FRESH_SINGLE_DIR "${PROJECT_BINARY_DIR}/generated/single")
    set(_vramguard_fresh_single "${VRAMGUARD_FRESH_SINGLE_DIR}/vramguard/vramguard.hpp")
    file(GLOB_RECURSE _vramguard_split_headers CONFIGURE_DEPENDS
         "${PROJECT_SOURCE_DIR}/include/vramguard/*.hpp")
    add_custom_command(
        OUTPUT "${_vramguard_fresh_single}"
        COMMAND "${CMAKE_COMMAND}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
                "-DOUTPUT=${_vramguard_fresh_single}" -DFORCE_WRITE=ON
                -P "${VRAMGUARD_AMALGAMATE_SCRIPT}"
        DEPENDS ${_vramguard_split_headers} "${VRAMGUARD_AMALGAMATE_SCRIPT}"
        COMMENT "Generating the single header in the build tree"
        VERBATIM)
    add_custom_target(vramguard_single_fresh_header DEPENDS "${_vramguard_fresh_single}")
    add_library(vramguard_single_fresh INTERFACE)
    target_include_directories(vramguard_single_fresh INTERFACE "${VRAMGUARD_FRESH_SINGLE_DIR}")
    target_compile_features(vramguard_single_fresh INTERFACE cxx_std_17)
    target_link_libraries(vramguard_single_fresh INTERFACE Threads::Threads)
endif()
