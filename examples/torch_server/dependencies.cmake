# SPDX-License-Identifier: MIT
# What examples/torch_server needs besides vramguard::torch, found the same way for the server
# (examples/CMakeLists.txt) and for its end-to-end test (tests/CMakeLists.txt), which reads this
# before the examples directory exists.
#
# vramguard_torch_server_dependencies(<out_var>): sets <out_var> to the libraries to link (an
# httplib target and nlohmann_json::nlohmann_json), or to "" when either is missing. The imported
# targets are created in the calling directory. prometheus-cpp (Debian: prometheus-cpp-dev) is
# optional: where vramguard::prometheus exists, the list also holds vramguard_torch_server_metrics,
# which links it and defines TORCH_SERVER_HAS_PROMETHEUS=1 (GET /metrics);
# without it the server builds and /metrics answers 404 saying why. vramguard::peers (the HTTP
# peer adapters, for --peer) is linked where the top level defined it.
function(vramguard_torch_server_dependencies out_var)
    # cpp-httplib, found as vramguard::peers finds it (cmake/vramguardDependencies.cmake).
    vramguard_find_httplib(httplib_target)
    find_package(nlohmann_json 3 CONFIG QUIET)
    set(metrics_target "")
    # /metrics uses vramguard's own exporter (vramguard::prometheus, where prometheus-cpp was found).
    if(TARGET vramguard::prometheus)
        if(NOT TARGET vramguard_torch_server_metrics)
            add_library(vramguard_torch_server_metrics INTERFACE IMPORTED)
            set_target_properties(vramguard_torch_server_metrics PROPERTIES
                INTERFACE_LINK_LIBRARIES vramguard::prometheus
                INTERFACE_COMPILE_DEFINITIONS TORCH_SERVER_HAS_PROMETHEUS=1)
        endif()
        set(metrics_target vramguard_torch_server_metrics)
    endif()
    # vramguard's HTTP peer adapters (--peer KIND=URL), where the top level built them.
    set(peers_target "")
    if(TARGET vramguard::peers)
        set(peers_target vramguard::peers)
    endif()
    if(httplib_target AND TARGET nlohmann_json::nlohmann_json)
        # vramguard's core headers too: the end-to-end test includes the server's own
        # shared_device.hpp (the simulated device both servers and the test map).
        set(${out_var}
            "vramguard::vramguard;${httplib_target};nlohmann_json::nlohmann_json;${metrics_target};${peers_target}"
            PARENT_SCOPE)
    else()
        set(${out_var} "" PARENT_SCOPE)
    endif()
endfunction()
