// SPDX-License-Identifier: MIT
// Which CUDA statuses mean "there is no device for this process to use" rather than "the device
// failed": cuda::check (cuda_error.hpp) throws DeviceUnavailable for them, which callers handle by
// running elsewhere. Part of the CUDA backend (vramguard::cuda).
#pragma once

#include <vramguard/version.hpp>

#include <cuda_runtime_api.h>

VRAMGUARD_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

// Errors that mean "there is no device for this process to use", as opposed to "the device failed":
// no GPU, no or too old a driver, a bad index, a GPU in exclusive mode held by another process, or
// a binary built without code for this architecture. Callers handle these by running elsewhere
// (or skipping a test), so they get their own type.
inline bool is_unavailable(cudaError_t status) noexcept {
    switch (status) {
        case cudaErrorNoDevice:
        case cudaErrorInsufficientDriver:
        case cudaErrorInvalidDevice:
        case cudaErrorNoKernelImageForDevice:
        case cudaErrorDevicesUnavailable:
        case cudaErrorDeviceNotLicensed:
        case cudaErrorInitializationError:
        case cudaErrorSystemNotReady:
#if CUDART_VERSION >= 10010
        case cudaErrorSystemDriverMismatch:
        case cudaErrorCompatNotSupportedOnDevice:
#endif
#if CUDART_VERSION >= 11010
        case cudaErrorStubLibrary:  // linked against the toolkit's stub libcuda, no real driver
        case cudaErrorCallRequiresNewerDriver:
        case cudaErrorUnsupportedPtxVersion:
#endif
            return true;
        default: return false;
    }
}

}  // namespace detail
}  // namespace cuda
VRAMGUARD_END_NAMESPACE
