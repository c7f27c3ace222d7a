// SPDX-License-Identifier: MIT
// vramguard: admission, learning and OOM recovery for programs that share a GPU.
// The core: standard library + POSIX only. The backends are separate headers: cuda.hpp (CUDA
// Runtime) and torch.hpp (LibTorch).
#pragma once

#include <vramguard/version.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/log.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/options.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/key.hpp>
#include <vramguard/profile_record.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/semaphore.hpp>
#include <vramguard/coordinator.hpp>
#include <vramguard/simulated.hpp>
#include <vramguard/system_memory.hpp>
#include <vramguard/events.hpp>
#include <vramguard/batch_view.hpp>
#include <vramguard/admission.hpp>
#include <vramguard/recovery.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/batcher_options.hpp>
#include <vramguard/batcher.hpp>
#include <vramguard/ledger_state.hpp>
#include <vramguard/host.hpp>
#include <vramguard/model_status.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/eviction.hpp>
#include <vramguard/pressure.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/protocol.hpp>
#include <vramguard/relief.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/registry_options.hpp>
#include <vramguard/models.hpp>
