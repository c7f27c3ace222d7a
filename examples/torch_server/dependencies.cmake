# SPDX-License-Identifier: MIT
# What examples/torch_server needs besides vramguard::torch, found the same way for the server
# (examples/CMakeLists.txt) and for its end-to-end test (tests/CMakeLists.txt), which reads this
# before the examples directory exists.
#
# vramguard_torch_server_dependencies(<out_var>): sets <out_var> to the libraries to link (an
# httplib target and nlohmann_json::nlohmann_json), or to "" when either is missing. The imported
# targets are created in the calling directory.
function(vramguard_torch_server_dependencies out_var)
    # cpp-httplib: its CMake package where installed from source; Debian's libcpp-httplib-dev
    # ships only a pkg-config file (and a compiled libcpp-httplib.so, whose -D flags the headers
    # must be compiled with: pkg-config carries them).
    set(httplib_target "")
    find_package(httplib CONFIG QUIET)
    if(TARGET httplib::httplib)
        set(httplib_target httplib::httplib)
    else()
        find_package(PkgConfig QUIET)
        if(PKG_CONFIG_FOUND)
            pkg_check_modules(VRAMGUARD_HTTPLIB QUIET IMPORTED_TARGET cpp-httplib)
            if(TARGET PkgConfig::VRAMGUARD_HTTPLIB)
                set(httplib_target PkgConfig::VRAMGUARD_HTTPLIB)
            endif()
        endif()
    endif()
    find_package(nlohmann_json 3 CONFIG QUIET)
    if(httplib_target AND TARGET nlohmann_json::nlohmann_json)
        set(${out_var} "${httplib_target};nlohmann_json::nlohmann_json" PARENT_SCOPE)
    else()
        set(${out_var} "" PARENT_SCOPE)
    endif()
endfunction()
