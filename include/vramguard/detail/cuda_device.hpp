// SPDX-License-Identifier: MIT
// One CUDA device as the backend's probes see it: made current for one scope (CurrentDevice), its
// free and total memory (read_memory), and its stable name across processes (device_key). Shared
// by cuda::Probe (cuda.hpp) and torch::Probe (torch.hpp).
#pragma once

#include <vramguard/cuda_error.hpp>
#include <vramguard/detail/oom_text.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

// Makes `device` current for one scope and puts the thread's previous device back, so a probe of
// device 1 does not silently move the caller's next allocation there.
// Caveat: since CUDA 12, cudaSetDevice creates the device's primary context at once, so restoring
// a thread that never chose a device (it reads as 0) initialises device 0's context too.
class CurrentDevice {
   public:
    CurrentDevice(int device, const char* who) {
        check(cudaGetDevice(&previous_), std::string(who) + ": cudaGetDevice");
        if (previous_ != device) {
            check(cudaSetDevice(device),
                  std::string(who) + ": cudaSetDevice(" + std::to_string(device) + ")");
            switched_ = true;
        }
    }
    ~CurrentDevice() {
        if (switched_ && cudaSetDevice(previous_) != cudaSuccess)
            static_cast<void>(cudaGetLastError());
    }
    CurrentDevice(const CurrentDevice&) = delete;
    CurrentDevice& operator=(const CurrentDevice&) = delete;

   private:
    int previous_ = 0;
    bool switched_ = false;
};

inline MemoryInfo read_memory(int device, const char* who) {
    CurrentDevice current(device, who);
    std::size_t free_bytes = 0, total_bytes = 0;
    check(cudaMemGetInfo(&free_bytes, &total_bytes),
          "cudaMemGetInfo on device " + std::to_string(device));
    return MemoryInfo{free_bytes, total_bytes};
}

// The device's UUID (the one nvidia-smi prints as GPU-...; a MIG instance's own UUID on MIG), which
// stays the same whatever CUDA_VISIBLE_DEVICES renumbers: that is what lets worker processes with
// different device orders agree on one host-wide ledger per GPU. The PCI bus id is the fallback
// for a device that reports no UUID.
inline std::string device_key(int device) {
    cudaDeviceProp properties{};
    check(cudaGetDeviceProperties(&properties, device),
          "cudaGetDeviceProperties on device " + std::to_string(device));
    const auto* bytes = reinterpret_cast<const unsigned char*>(properties.uuid.bytes);
    bool all_zero = true;
    for (int i = 0; i < 16; ++i) all_zero = all_zero && bytes[i] == 0;
    if (all_zero) {
        char bus_id[32] = {};
        check(cudaDeviceGetPCIBusId(bus_id, static_cast<int>(sizeof bus_id), device),
              "cudaDeviceGetPCIBusId on device " + std::to_string(device));
        std::string key = std::string("cuda-pci-") + bus_id;
        for (char& c : key) c = vramguard::detail::ascii_lower(c);
        return key;
    }
    // 8-4-4-4-12 lowercase hex, as nvidia-smi writes it, so an operator can grep for it.
    std::string key = "cuda-";
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; ++i) {
        if (i == 4 || i == 6 || i == 8 || i == 10) key += '-';
        key += digits[bytes[i] >> 4];
        key += digits[bytes[i] & 0xF];
    }
    return key;
}

}  // namespace detail
}  // namespace cuda
VRAMGUARD_END_NAMESPACE
