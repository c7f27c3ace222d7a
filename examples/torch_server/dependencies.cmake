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
# peer adapters, for --peer) is linked where the top level defined it. CLI11 (Debian:
# libcli11-dev) parses the command line and is required, as for examples/vram_manager.
# SentencePiece (Debian: libsentencepiece-dev) is optional: where found, the list also holds
# vramguard_torch_server_sentencepiece (TORCH_SERVER_HAS_SENTENCEPIECE=1, for --tokenizer);
# without it the server builds and --tokenizer exits saying why.
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
    vramguard_find_cli11(cli11_target)
    vramguard_find_sentencepiece(sentencepiece_target)
    # vramguard's HTTP peer adapters (--peer KIND=URL), where the top level built them.
    set(peers_target "")
    if(TARGET vramguard::peers)
        set(peers_target vramguard::peers)
    endif()
    if(httplib_target AND TARGET nlohmann_json::nlohmann_json AND cli11_target)
        # vramguard's core headers too: the end-to-end test includes the server's own
        # shared_device.hpp (the simulated device both servers and the test map).
        set(${out_var}
            "vramguard::vramguard;${httplib_target};nlohmann_json::nlohmann_json;${cli11_target};${metrics_target};${peers_target};${sentencepiece_target}"
            PARENT_SCOPE)
    else()
        set(${out_var} "" PARENT_SCOPE)
    endif()
endfunction()

# CLI11 (Debian: libcli11-dev), header-only: both example programs parse their flags with it.
# Sets <out_var> to CLI11::CLI11, or to "" when it is missing.
function(vramguard_find_cli11 out_var)
    if(NOT TARGET CLI11::CLI11)
        find_package(CLI11 CONFIG QUIET)
    endif()
    if(TARGET CLI11::CLI11)
        set(${out_var} CLI11::CLI11 PARENT_SCOPE)
    else()
        set(${out_var} "" PARENT_SCOPE)
    endif()
endfunction()

# SentencePiece (Debian: libsentencepiece-dev): its pkg-config file, else the bare libraries and
# header. Where found, builds libvramguard_sentencepiece_shim.so (a MODULE library: SentencePiece
# behind a C interface, linked to the processor and trainer libraries) and sets <out_var> to
# vramguard_torch_server_sentencepiece (an interface target defining
# TORCH_SERVER_HAS_SENTENCEPIECE=1 and TORCH_SERVER_SENTENCEPIECE_SHIM, the module's path, and
# linking libdl); else to "". Nothing links SentencePiece itself: torch_server dlopens the shim
# (examples/torch_server/sentencepiece/sentencepiece_shim.h says why). A target that uses it also
# needs add_dependencies(<target> vramguard_sentencepiece_shim).
function(vramguard_find_sentencepiece out_var)
    if(NOT TARGET vramguard_torch_server_sentencepiece)
        set(libs "")
        find_package(PkgConfig QUIET)
        if(PKG_CONFIG_FOUND)
            pkg_check_modules(VRAMGUARD_SENTENCEPIECE QUIET IMPORTED_TARGET GLOBAL sentencepiece)
        endif()
        if(TARGET PkgConfig::VRAMGUARD_SENTENCEPIECE)
            set(libs PkgConfig::VRAMGUARD_SENTENCEPIECE)
        else()
            find_path(VRAMGUARD_SENTENCEPIECE_INCLUDE sentencepiece_processor.h)
            find_library(VRAMGUARD_SENTENCEPIECE_LIB sentencepiece)
            find_library(VRAMGUARD_SENTENCEPIECE_TRAIN_LIB sentencepiece_train)
            if(VRAMGUARD_SENTENCEPIECE_INCLUDE AND VRAMGUARD_SENTENCEPIECE_LIB
               AND VRAMGUARD_SENTENCEPIECE_TRAIN_LIB)
                set(libs "${VRAMGUARD_SENTENCEPIECE_TRAIN_LIB};${VRAMGUARD_SENTENCEPIECE_LIB}")
            endif()
        endif()
        if(NOT libs)
            message(STATUS "vramguard: SentencePiece not found (Debian: libsentencepiece-dev): "
                           "torch_server is built without --tokenizer")
            set(${out_var} "" PARENT_SCOPE)
            return()
        endif()
        set(shim_dir "${PROJECT_SOURCE_DIR}/examples/torch_server/sentencepiece")
        add_library(vramguard_sentencepiece_shim MODULE "${shim_dir}/sentencepiece_shim.cpp")
        set_target_properties(vramguard_sentencepiece_shim PROPERTIES
            CXX_VISIBILITY_PRESET hidden
            LIBRARY_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/examples")
        # The libraries themselves, for a program that has no LibTorch (the tests' tool).
        add_library(vramguard_sentencepiece_libs INTERFACE)
        target_link_libraries(vramguard_sentencepiece_libs INTERFACE ${libs})
        if(VRAMGUARD_SENTENCEPIECE_INCLUDE)
            target_include_directories(vramguard_sentencepiece_libs INTERFACE
                "${VRAMGUARD_SENTENCEPIECE_INCLUDE}")
        endif()
        target_link_libraries(vramguard_sentencepiece_shim PRIVATE vramguard_sentencepiece_libs)
        vramguard_configure_own_target(vramguard_sentencepiece_shim)
        add_library(vramguard_torch_server_sentencepiece INTERFACE)
        target_compile_definitions(vramguard_torch_server_sentencepiece INTERFACE
            TORCH_SERVER_HAS_SENTENCEPIECE=1
            "TORCH_SERVER_SENTENCEPIECE_SHIM=\"$<TARGET_FILE:vramguard_sentencepiece_shim>\"")
        target_link_libraries(vramguard_torch_server_sentencepiece INTERFACE ${CMAKE_DL_LIBS})
    endif()
    set(${out_var} vramguard_torch_server_sentencepiece PARENT_SCOPE)
endfunction()
