# SPDX-License-Identifier: MIT
# Fresh install of the build tree into PREFIX (the consumer tests' fixture).
file(REMOVE_RECURSE "${PREFIX}")
set(config_args "")
if(CONFIG)
    set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed (${rc})")
endif()
foreach(expected include/vramguard/vramguard.hpp)
    if(NOT EXISTS "${PREFIX}/${expected}")
        message(FATAL_ERROR "the install lacks ${expected}")
    endif()
endforeach()
