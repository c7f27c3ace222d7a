// SPDX-License-Identifier: MIT
// The seam between in-process admission (Guard) and host-wide admission (host.hpp). Guard asks a
// coordinator, when one is set, to check-and-reserve in one step, so pre-forked workers never both
// see "6 GiB free" and both load 6 GiB.
#pragma once

#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

// Something held while admitted work runs (a ledger entry, a lock); released on destruction.
class Hold {
   public:
    virtual ~Hold() = default;
};

class Coordinator {
   public:
    virtual ~Coordinator() = default;

    struct Decision {
        std::unique_ptr<Hold> hold;   // set when admitted
        std::uint64_t available = 0;  // what this process may take after others' reservations
        MemoryInfo seen;              // the reading the decision was made against
        std::string refused_because;  // refused although `available` fits (a full ledger), or ""
    };

    // Admits `required` bytes (plus `margin_bytes` kept free) against this process's probe reading
    // minus what other live processes have reserved but not yet allocated; on success the
    // reservation is held until the returned Hold is destroyed. One atomic step.
    //
    // The reading is taken here, by calling `read_memory` once after the coordinator's lock is
    // taken (once without it when the lock cannot be had), and returned in Decision::seen, which
    // Guard reports as what admission saw. A reading taken before the lock could predate a load
    // that another process finished (and stopped reserving for) while this one waited: compared
    // with a ledger that no longer shows that load, it would count the same memory as free. Taken
    // under the lock it is at least as fresh as the ledger. An exception from `read_memory`
    // propagates, with nothing reserved.
    virtual Decision try_reserve(std::uint64_t required, std::uint64_t margin_bytes,
                                 const std::function<MemoryInfo()>& read_memory) = 0;

    // Exclusion across processes for the single-item path; the kernel releases it if we die.
    virtual std::unique_ptr<Hold> lock_single_item() = 0;
};

VRAMGUARD_END_NAMESPACE
