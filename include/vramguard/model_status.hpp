// SPDX-License-Identifier: MIT
// What a model slot (model_slot.hpp) says about its model: its state, a status endpoint's view of
// it, and the answer to an unload request. A header of its own so that the slot's internals
// (detail/slot_base.hpp) can use them.
#pragma once

#include <vramguard/version.hpp>

#include <cstdint>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

enum class ModelState { unloaded, loading, loaded, unloading };

inline const char* to_string(ModelState state) noexcept {
    switch (state) {
        case ModelState::unloaded: return "unloaded";
        case ModelState::loading: return "loading";
        case ModelState::loaded: return "loaded";
        case ModelState::unloading: return "unloading";
    }
    return "?";
}

enum class UnloadOutcome {
    unloaded,    // it was loaded and idle long enough: its memory is given back
    busy,        // leased, being loaded, or idle for less than asked
    not_loaded,  // nothing to unload (or already on its way out)
};

inline const char* to_string(UnloadOutcome outcome) noexcept {
    switch (outcome) {
        case UnloadOutcome::unloaded: return "unloaded";
        case UnloadOutcome::busy: return "busy";
        case UnloadOutcome::not_loaded: return "not loaded";
    }
    return "?";
}

// The answer to request_unload(min_idle).
struct UnloadResult {
    UnloadOutcome outcome = UnloadOutcome::not_loaded;
    double idle_seconds = 0;  // since the last lease ended; 0 while leased or loading
    int leases = 0;           // alive when asked (busy because of them when > 0)
    std::uint64_t bytes = 0;  // counted as held (measured, else declared) when unloaded
    bool loading = false;     // busy because its registry is loading a model (peer relief)

    bool unloaded() const noexcept { return outcome == UnloadOutcome::unloaded; }
    bool busy() const noexcept { return outcome == UnloadOutcome::busy; }
};

// One model as status() saw it: what a status endpoint serialises.
struct ModelStatus {
    std::string name;
    std::string key;  // Key::hex(): 16 hex digits
    ModelState state = ModelState::unloaded;
    bool loaded = false;      // state == loaded
    std::uint64_t bytes = 0;  // counted as held (measured, else declared); 0 when not loaded
    double idle_seconds = 0;  // since the last lease ended; 0 while leased or not loaded
    int leases = 0;
};

VRAMGUARD_END_NAMESPACE
