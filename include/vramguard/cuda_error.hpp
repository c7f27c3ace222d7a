// SPDX-License-Identifier: MIT
// CUDA status codes turned into vramguard's error types: error_text(), cuda::Error and check(). A
// header of its own so that the backend's device helpers (detail/cuda_device.hpp) can check their
// calls; included by cuda.hpp, which is what a program includes (target vramguard::cuda).
#pragma once

#include <vramguard/errors.hpp>
#include <vramguard/version.hpp>

#if defined(__has_include)
#if !__has_include(<cuda_runtime_api.h>)
#error "vramguard/cuda.hpp needs the CUDA Runtime headers: link vramguard::cuda"
#endif
#endif

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#if !defined(CUDART_VERSION) || CUDART_VERSION < 10000
#error "vramguard/cuda.hpp needs CUDA 10.0 or newer (cudaDeviceProp::uuid identifies the device)"
#endif

#include <vramguard/detail/cuda_unavailable.hpp>

VRAMGUARD_BEGIN_NAMESPACE
namespace cuda {

// "cudaErrorNoDevice (no CUDA-capable device is detected)": the name greps well in logs and issue
// trackers, the description is what a person understands.
inline std::string error_text(cudaError_t status) {
    const char* name = cudaGetErrorName(status);
    const char* text = cudaGetErrorString(status);
    return std::string(name ? name : "cudaError?") + " (" + (text ? text : "no description") + ")";
}

// A CUDA call failed for a reason that is neither an OOM nor a missing device.
class Error : public std::runtime_error {
   public:
    // `context` names the call and its device: "cudaMemGetInfo on device 0".
    Error(cudaError_t code, const std::string& context)
        : std::runtime_error(context + " failed: " + error_text(code)), code_(code) {}
    cudaError_t code() const noexcept { return code_; }

   private:
    cudaError_t code_;
};

// Turns a CUDA status into vramguard's error types; success does nothing.
//   cudaErrorMemoryAllocation -> OutOfMemory of `oom_kind`. The default is `driver` because an OOM
//     from a kernel launch, a handle creation or a context creation can leave the CUDA context
//     unusable, so it must not be retried blindly; pass OomKind::allocator for cudaMalloc-style
//     calls, whose failure leaves the context healthy.
//   no device / driver / bad index / no kernel image -> DeviceUnavailable (error_code() = status).
//   anything else -> cuda::Error.
// A failed call also sets the thread's "last error"; it is cleared here (when not sticky), so a
// later cudaGetLastError() after an unrelated kernel launch does not report this one again.
inline void check(cudaError_t status, const char* what, OomKind oom_kind = OomKind::driver) {
    if (status == cudaSuccess) return;
    static_cast<void>(cudaGetLastError());
    const std::string context = what ? std::string(what) : std::string("CUDA call");
    if (status == cudaErrorMemoryAllocation)
        throw OutOfMemory(context + " failed: " + error_text(status), oom_kind);
    if (detail::is_unavailable(status))
        throw DeviceUnavailable(context + " failed: " + error_text(status),
                                static_cast<int>(status));
    throw Error(status, context);
}
inline void check(cudaError_t status, const std::string& what, OomKind oom_kind = OomKind::driver) {
    check(status, what.c_str(), oom_kind);
}

}  // namespace cuda
VRAMGUARD_END_NAMESPACE
