# SPDX-License-Identifier: MIT
# Install rules, the build-tree export ({fmt} style: dependants can point vramguard_DIR at a build
# directory without installing), the package config files and a pkg-config file.
#
# The core and each backend sit in separate export files; vramguardConfig.cmake always loads the
# core and loads a backend's file only when that backend's own dependency is found, so a plain
# find_package(vramguard) never needs CUDA or Torch.
include(CMakePackageConfigHelpers)

# Header-only: the package files are architecture-independent, so they go under share/.
set(VRAMGUARD_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/vramguard" CACHE STRING
    "Where vramguard's CMake package files are installed, relative to the prefix")
set(VRAMGUARD_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_DATADIR}/pkgconfig" CACHE STRING
    "Where vramguard.pc is installed, relative to the prefix")
mark_as_advanced(VRAMGUARD_INSTALL_CMAKEDIR VRAMGUARD_INSTALL_PKGCONFIGDIR)

set(_vramguard_exports vramguard)
if(TARGET vramguard_cuda)
    list(APPEND _vramguard_exports cuda)
endif()
if(TARGET vramguard_torch)
    list(APPEND _vramguard_exports torch)
endif()
if(TARGET vramguard_peers)
    list(APPEND _vramguard_exports peers)
endif()
if(TARGET vramguard_prometheus)
    list(APPEND _vramguard_exports prometheus)
endif()

# What the config file needs to know at configure time of a consumer.
set(VRAMGUARD_CONFIG_EXPORTS_CUDA OFF)
set(VRAMGUARD_CONFIG_EXPORTS_TORCH OFF)
set(VRAMGUARD_CONFIG_EXPORTS_PEERS OFF)
set(VRAMGUARD_CONFIG_EXPORTS_PROMETHEUS OFF)
# Which cpp-httplib target vramguard::peers links (httplib::httplib or the pkg-config one): the
# config file finds that one again for a consumer.
set(VRAMGUARD_CONFIG_PEERS_HTTPLIB "${VRAMGUARD_HTTP_PEERS_HTTPLIB}")
if(TARGET vramguard_cuda)
    set(VRAMGUARD_CONFIG_EXPORTS_CUDA ON)
endif()
if(TARGET vramguard_torch)
    set(VRAMGUARD_CONFIG_EXPORTS_TORCH ON)
endif()
if(TARGET vramguard_peers)
    set(VRAMGUARD_CONFIG_EXPORTS_PEERS ON)
endif()
if(TARGET vramguard_prometheus)
    set(VRAMGUARD_CONFIG_EXPORTS_PROMETHEUS ON)
endif()

# --- build tree ---------------------------------------------------------------------------------
export(TARGETS vramguard NAMESPACE vramguard:: FILE "${PROJECT_BINARY_DIR}/vramguardTargets.cmake")
if(TARGET vramguard_cuda)
    export(TARGETS vramguard_cuda NAMESPACE vramguard::
           FILE "${PROJECT_BINARY_DIR}/vramguardCudaTargets.cmake")
endif()
if(TARGET vramguard_torch)
    export(TARGETS vramguard_torch NAMESPACE vramguard::
           FILE "${PROJECT_BINARY_DIR}/vramguardTorchTargets.cmake")
endif()
if(TARGET vramguard_peers)
    export(TARGETS vramguard_peers NAMESPACE vramguard::
           FILE "${PROJECT_BINARY_DIR}/vramguardPeersTargets.cmake")
endif()
if(TARGET vramguard_prometheus)
    export(TARGETS vramguard_prometheus NAMESPACE vramguard::
           FILE "${PROJECT_BINARY_DIR}/vramguardPrometheusTargets.cmake")
endif()
configure_package_config_file(
    "${CMAKE_CURRENT_LIST_DIR}/vramguardConfig.cmake.in"
    "${PROJECT_BINARY_DIR}/vramguardConfig.cmake"
    INSTALL_DESTINATION "${PROJECT_BINARY_DIR}"
    INSTALL_PREFIX "${PROJECT_BINARY_DIR}"
    NO_CHECK_REQUIRED_COMPONENTS_MACRO)
if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.14)
    set(_vramguard_arch_independent ARCH_INDEPENDENT)
endif()
write_basic_package_version_file(
    "${PROJECT_BINARY_DIR}/vramguardConfigVersion.cmake"
    VERSION ${PROJECT_VERSION}
    COMPATIBILITY SameMajorVersion
    ${_vramguard_arch_independent})

# --- install tree -------------------------------------------------------------------------------
if(VRAMGUARD_INSTALL)
    install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/vramguard"
            DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
            FILES_MATCHING PATTERN "*.hpp")

    install(TARGETS vramguard EXPORT vramguardTargets)
    install(EXPORT vramguardTargets NAMESPACE vramguard::
            FILE vramguardTargets.cmake DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")
    if(TARGET vramguard_cuda)
        install(TARGETS vramguard_cuda EXPORT vramguardCudaTargets)
        install(EXPORT vramguardCudaTargets NAMESPACE vramguard::
                FILE vramguardCudaTargets.cmake DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")
    endif()
    if(TARGET vramguard_torch)
        install(TARGETS vramguard_torch EXPORT vramguardTorchTargets)
        install(EXPORT vramguardTorchTargets NAMESPACE vramguard::
                FILE vramguardTorchTargets.cmake DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")
    endif()
    if(TARGET vramguard_peers)
        install(TARGETS vramguard_peers EXPORT vramguardPeersTargets)
        install(EXPORT vramguardPeersTargets NAMESPACE vramguard::
                FILE vramguardPeersTargets.cmake DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")
    endif()
    if(TARGET vramguard_prometheus)
        install(TARGETS vramguard_prometheus EXPORT vramguardPrometheusTargets)
        install(EXPORT vramguardPrometheusTargets NAMESPACE vramguard::
                FILE vramguardPrometheusTargets.cmake DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")
    endif()

    configure_package_config_file(
        "${CMAKE_CURRENT_LIST_DIR}/vramguardConfig.cmake.in"
        "${PROJECT_BINARY_DIR}/install/vramguardConfig.cmake"
        INSTALL_DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}"
        NO_CHECK_REQUIRED_COMPONENTS_MACRO)
    install(FILES
            "${PROJECT_BINARY_DIR}/install/vramguardConfig.cmake"
            "${PROJECT_BINARY_DIR}/vramguardConfigVersion.cmake"
            DESTINATION "${VRAMGUARD_INSTALL_CMAKEDIR}")

    # pkg-config: relocatable (prefix found from the .pc file's own place), so that
    # `cmake --install build --prefix anywhere` gives a working file.
    if(IS_ABSOLUTE "${VRAMGUARD_INSTALL_PKGCONFIGDIR}")
        set(VRAMGUARD_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
    else()
        file(RELATIVE_PATH _vramguard_pc_up "/prefix/${VRAMGUARD_INSTALL_PKGCONFIGDIR}" "/prefix")
        string(REGEX REPLACE "/$" "" _vramguard_pc_up "${_vramguard_pc_up}")
        set(VRAMGUARD_PC_PREFIX "\${pcfiledir}/${_vramguard_pc_up}")
    endif()
    if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
        set(VRAMGUARD_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
    else()
        set(VRAMGUARD_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
    endif()
    configure_file("${CMAKE_CURRENT_LIST_DIR}/vramguard.pc.in"
                   "${PROJECT_BINARY_DIR}/vramguard.pc" @ONLY)
    install(FILES "${PROJECT_BINARY_DIR}/vramguard.pc"
            DESTINATION "${VRAMGUARD_INSTALL_PKGCONFIGDIR}")
endif()
