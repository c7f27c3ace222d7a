# SPDX-License-Identifier: MIT
# Finding the optional backends' dependencies, each inside a function so that the variables
# their find modules and config files set (TORCH_LIBRARIES, CUDAToolkit_*, ...) stay contained.
# Only the imported targets (CUDA::cudart, torch) and VRAMGUARD_HAS_<X> come out.

# Imported targets live in the directory that found them. When vramguard is a subproject, the
# project above links vramguard::torch / vramguard::cuda from its own directory, where LibTorch's
# targets (whose usage requirements name torch_cpu through generator expressions) would not be
# visible: promote what this directory imported to global targets.
function(_vramguard_promote_imported_targets)
    if(VRAMGUARD_MAIN_PROJECT)
        return()
    endif()
    if(CMAKE_VERSION VERSION_LESS 3.21)
        set(targets ${ARGN})
    else()
        get_property(targets DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
    endif()
    foreach(target IN LISTS targets)
        if(TARGET ${target})
            get_target_property(is_imported ${target} IMPORTED)
            get_target_property(is_global ${target} IMPORTED_GLOBAL)
            if(is_imported AND NOT is_global)
                set_property(TARGET ${target} PROPERTY IMPORTED_GLOBAL TRUE)
            endif()
        endif()
    endforeach()
endfunction()

# Where a CUDA toolkit usually lives when nvcc is not on PATH (the runfile installer's default).
function(_vramguard_cuda_hint out_var)
    set(${out_var} "" PARENT_SCOPE)
    if(DEFINED CUDAToolkit_ROOT OR DEFINED ENV{CUDAToolkit_ROOT} OR DEFINED ENV{CUDA_PATH})
        return()
    endif()
    find_program(_vramguard_nvcc nvcc NO_CACHE)
    if(_vramguard_nvcc)
        return()
    endif()
    foreach(candidate /usr/local/cuda /opt/cuda)
        if(EXISTS "${candidate}/bin/nvcc" OR EXISTS "${candidate}/include/cuda_runtime_api.h")
            set(${out_var} "${candidate}" PARENT_SCOPE)
            return()
        endif()
    endforeach()
endfunction()

function(vramguard_find_cuda)
    set(VRAMGUARD_HAS_CUDA OFF PARENT_SCOPE)
    if(NOT VRAMGUARD_USE_CUDA_IF_AVAILABLE AND NOT VRAMGUARD_REQUIRE_CUDA)
        return()
    endif()
    if(NOT TARGET CUDA::cudart)
        _vramguard_cuda_hint(hint)
        if(hint)
            set(CUDAToolkit_ROOT "${hint}")
        endif()
        if(VRAMGUARD_REQUIRE_CUDA)
            find_package(CUDAToolkit REQUIRED)
        else()
            find_package(CUDAToolkit QUIET)
        endif()
    endif()
    if(TARGET CUDA::cudart)
        _vramguard_promote_imported_targets(CUDA::cudart CUDA::toolkit CUDA::cudart_static
                                            CUDA::cuda_driver)
        set(VRAMGUARD_HAS_CUDA ON PARENT_SCOPE)
        if(CUDAToolkit_VERSION)
            message(STATUS "vramguard: CUDA ${CUDAToolkit_VERSION} found (${CUDAToolkit_LIBRARY_DIR})")
        endif()
    elseif(VRAMGUARD_REQUIRE_CUDA)
        message(FATAL_ERROR "vramguard: VRAMGUARD_REQUIRE_CUDA is ON but CUDA::cudart was not found")
    else()
        message(STATUS "vramguard: CUDA toolkit not found; vramguard::cuda is not provided")
    endif()
endfunction()

# Where LibTorch usually lives when nobody said: a pip-installed torch, or an unpacked libtorch.
function(_vramguard_torch_hints out_var)
    set(hints "")
    foreach(candidate /usr/local/libtorch /opt/libtorch "$ENV{HOME}/libtorch")
        if(EXISTS "${candidate}/share/cmake/Torch/TorchConfig.cmake")
            list(APPEND hints "${candidate}")
        endif()
    endforeach()
    find_program(_vramguard_python NAMES python3 python NO_CACHE)
    if(_vramguard_python)
        execute_process(
            COMMAND "${_vramguard_python}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
            OUTPUT_VARIABLE python_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
            ERROR_QUIET RESULT_VARIABLE rc TIMEOUT 60)
        if(rc EQUAL 0 AND EXISTS "${python_prefix}")
            list(APPEND hints "${python_prefix}")
        endif()
    endif()
    set(${out_var} "${hints}" PARENT_SCOPE)
endfunction()

function(vramguard_find_torch)
    set(VRAMGUARD_HAS_TORCH OFF PARENT_SCOPE)
    if(NOT VRAMGUARD_USE_TORCH_IF_AVAILABLE AND NOT VRAMGUARD_REQUIRE_TORCH)
        return()
    endif()
    if(NOT TARGET torch)
        # First the normal search (Torch_DIR, CMAKE_PREFIX_PATH, /usr/lib/<arch>/cmake/Torch for
        # Debian's libtorch-dev), then the usual places as a fallback.
        find_package(Torch CONFIG QUIET)
        if(NOT TARGET torch)
            _vramguard_torch_hints(hints)
            if(hints)
                find_package(Torch CONFIG QUIET HINTS ${hints})
            endif()
        endif()
    endif()
    if(TARGET torch)
        _vramguard_promote_imported_targets(torch torch_cpu torch_library c10 caffe2::Threads
                                            protobuf::libprotobuf gflags glog::glog c10_cuda
                                            torch_cuda torch_cuda_library torch::cudart
                                            torch::nvtoolsext caffe2::cudart caffe2::cuda)
        set(VRAMGUARD_HAS_TORCH ON PARENT_SCOPE)
        message(STATUS "vramguard: LibTorch found (${Torch_DIR})")
    elseif(VRAMGUARD_REQUIRE_TORCH)
        message(FATAL_ERROR "vramguard: VRAMGUARD_REQUIRE_TORCH is ON but LibTorch was not found; "
                            "set Torch_DIR or CMAKE_PREFIX_PATH to the directory holding TorchConfig.cmake")
    else()
        message(STATUS "vramguard: LibTorch not found; vramguard::torch is not provided")
    endif()
endfunction()

# Sanitizers and warnings for vramguard's own executables only: never global flags, never on the
# exported targets.
function(vramguard_configure_own_target target)
    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
        target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
        if(VRAMGUARD_WERROR)
            target_compile_options(${target} PRIVATE -Werror)
        endif()
    elseif(MSVC)
        target_compile_options(${target} PRIVATE /W4 $<$<BOOL:${VRAMGUARD_WERROR}>:/WX>)
    endif()
    if(VRAMGUARD_SANITIZE)
        string(REPLACE ";" "," sanitizers "${VRAMGUARD_SANITIZE}")
        target_compile_options(${target} PRIVATE
            -fsanitize=${sanitizers} -fno-omit-frame-pointer -fno-sanitize-recover=all)
        target_link_options(${target} PRIVATE -fsanitize=${sanitizers})
    endif()
endfunction()

# spdlog, for the logging example and its test only: the library never includes or links it (the
# log sink is a std::function; the adapter is three lines in examples/spdlog_sink.hpp). Found
# quietly, and only by the main project when it builds examples or tests.
function(vramguard_find_spdlog)
    set(VRAMGUARD_HAS_SPDLOG OFF PARENT_SCOPE)
    if(NOT VRAMGUARD_MAIN_PROJECT OR NOT (VRAMGUARD_BUILD_EXAMPLES OR VRAMGUARD_BUILD_TESTS))
        return()
    endif()
    if(NOT TARGET spdlog::spdlog)
        find_package(spdlog CONFIG QUIET)
    endif()
    if(TARGET spdlog::spdlog)
        set(VRAMGUARD_HAS_SPDLOG ON PARENT_SCOPE)
        message(STATUS "vramguard: spdlog ${spdlog_VERSION} found: the spdlog example and test are built")
    elseif(VRAMGUARD_REQUIRE_SPDLOG)
        message(FATAL_ERROR "vramguard: VRAMGUARD_REQUIRE_SPDLOG is ON but spdlog was not found "
                            "(Debian: apt-get install libspdlog-dev); set spdlog_DIR or CMAKE_PREFIX_PATH")
    else()
        message(STATUS "vramguard: spdlog not found; the spdlog example and test are skipped")
    endif()
endfunction()

# cpp-httplib: its CMake package where it was installed from source, else Debian's pkg-config file
# (libcpp-httplib-dev 0.11 is a compiled library, -lcpp-httplib, and its .pc carries the
# CPPHTTPLIB_OPENSSL/ZLIB/BROTLI_SUPPORT defines the headers must be compiled with). Sets
# <out_var> to the target (httplib::httplib or PkgConfig::VRAMGUARD_HTTPLIB), or to "". The
# pkg-config target is GLOBAL and a second call finds the first one's target: vramguard::peers,
# examples/ and tests/ (examples/torch_server/dependencies.cmake) link the same one.
function(vramguard_find_httplib out_var)
    if(NOT TARGET httplib::httplib AND NOT TARGET PkgConfig::VRAMGUARD_HTTPLIB)
        find_package(httplib CONFIG QUIET)
    endif()
    if(TARGET httplib::httplib)
        set(${out_var} httplib::httplib PARENT_SCOPE)
        return()
    endif()
    if(NOT TARGET PkgConfig::VRAMGUARD_HTTPLIB)
        find_package(PkgConfig QUIET)
        if(PKG_CONFIG_FOUND)
            pkg_check_modules(VRAMGUARD_HTTPLIB QUIET IMPORTED_TARGET GLOBAL cpp-httplib)
        endif()
    endif()
    if(TARGET PkgConfig::VRAMGUARD_HTTPLIB)
        set(${out_var} PkgConfig::VRAMGUARD_HTTPLIB PARENT_SCOPE)
    else()
        set(${out_var} "" PARENT_SCOPE)
    endif()
endfunction()

# cpp-httplib and nlohmann/json, for vramguard::peers (include/vramguard/peers_http.hpp). Sets
# VRAMGUARD_HAS_HTTP_PEERS and VRAMGUARD_HTTP_PEERS_LIBS (the httplib target and
# nlohmann_json::nlohmann_json), and VRAMGUARD_HTTP_PEERS_HTTPLIB (which httplib target: the
# package config file finds the same one for a consumer).
function(vramguard_find_http_peers)
    set(VRAMGUARD_HAS_HTTP_PEERS OFF PARENT_SCOPE)
    set(VRAMGUARD_HTTP_PEERS_LIBS "" PARENT_SCOPE)
    set(VRAMGUARD_HTTP_PEERS_HTTPLIB "" PARENT_SCOPE)
    if(NOT VRAMGUARD_USE_HTTP_PEERS_IF_AVAILABLE AND NOT VRAMGUARD_REQUIRE_HTTP_PEERS)
        return()
    endif()
    vramguard_find_httplib(httplib_target)
    if(NOT TARGET nlohmann_json::nlohmann_json)
        find_package(nlohmann_json 3 CONFIG QUIET)
    endif()
    if(httplib_target AND TARGET nlohmann_json::nlohmann_json)
        _vramguard_promote_imported_targets(httplib::httplib nlohmann_json::nlohmann_json)
        set(VRAMGUARD_HAS_HTTP_PEERS ON PARENT_SCOPE)
        set(VRAMGUARD_HTTP_PEERS_LIBS "${httplib_target};nlohmann_json::nlohmann_json" PARENT_SCOPE)
        set(VRAMGUARD_HTTP_PEERS_HTTPLIB "${httplib_target}" PARENT_SCOPE)
        message(STATUS "vramguard: cpp-httplib (${httplib_target}) and nlohmann_json found: "
                       "vramguard::peers is provided")
    elseif(VRAMGUARD_REQUIRE_HTTP_PEERS)
        message(FATAL_ERROR "vramguard: VRAMGUARD_REQUIRE_HTTP_PEERS is ON but cpp-httplib or "
                            "nlohmann_json was not found (Debian: apt-get install "
                            "libcpp-httplib-dev nlohmann-json3-dev)")
    else()
        message(STATUS "vramguard: cpp-httplib or nlohmann_json not found; vramguard::peers is not provided")
    endif()
endfunction()

# prometheus-cpp's core library (Debian: prometheus-cpp-dev), for vramguard::prometheus
# (include/vramguard/prometheus.hpp). Sets VRAMGUARD_HAS_PROMETHEUS.
function(vramguard_find_prometheus)
    set(VRAMGUARD_HAS_PROMETHEUS OFF PARENT_SCOPE)
    if(NOT VRAMGUARD_USE_PROMETHEUS_IF_AVAILABLE AND NOT VRAMGUARD_REQUIRE_PROMETHEUS)
        return()
    endif()
    if(NOT TARGET prometheus-cpp::core)
        find_package(prometheus-cpp CONFIG QUIET)
    endif()
    if(TARGET prometheus-cpp::core)
        _vramguard_promote_imported_targets(prometheus-cpp::core prometheus-cpp::pull
                                            prometheus-cpp::push)
        set(VRAMGUARD_HAS_PROMETHEUS ON PARENT_SCOPE)
        message(STATUS "vramguard: prometheus-cpp found: vramguard::prometheus is provided")
    elseif(VRAMGUARD_REQUIRE_PROMETHEUS)
        message(FATAL_ERROR "vramguard: VRAMGUARD_REQUIRE_PROMETHEUS is ON but prometheus-cpp was "
                            "not found (Debian: apt-get install prometheus-cpp-dev); set "
                            "prometheus-cpp_DIR or CMAKE_PREFIX_PATH")
    else()
        message(STATUS "vramguard: prometheus-cpp not found; vramguard::prometheus is not provided")
    endif()
endfunction()
