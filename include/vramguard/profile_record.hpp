// SPDX-License-Identifier: MIT
// What a ProfileCache (profile.hpp) keeps for one Key: the window of measured samples, the peaks
// derived from it, and the batch ceiling / weight budget that last worked.
#pragma once

#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// One measured run, as the profile keeps it: what ran (`size`: items or weight units, 0 for a
// load), what it took at its peak, and when (a wall-clock stamp in ns, which orders samples from
// every process and tells a sample already merged from a new one).
struct ProfileSample {
    std::uint64_t stamp = 0;
    std::uint64_t size = 0;
    std::uint64_t peak_bytes = 0;

    friend bool operator==(const ProfileSample& a, const ProfileSample& b) noexcept {
        return a.stamp == b.stamp && a.size == b.size && a.peak_bytes == b.peak_bytes;
    }
    friend bool operator<(const ProfileSample& a, const ProfileSample& b) noexcept {
        if (a.stamp != b.stamp) return a.stamp < b.stamp;
        if (a.size != b.size) return a.size < b.size;
        return a.peak_bytes < b.peak_bytes;
    }
};

// Samples kept per key and kind, the newest: a wrong reading (another process's allocation seen
// as ours) ages out after this many newer ones instead of winning for ever. One window: the
// profile keeps exactly what the cost model fits (policy::cost_window).
inline constexpr std::size_t profile_window = policy::cost_window;

// What is known about one key; 0 or empty means "not known yet".
struct Profile {
    Profile() = default;
    Profile(std::uint64_t peak, std::uint64_t per_item, std::uint64_t ceiling, std::uint64_t budget)
        : peak_bytes(peak),
          peak_bytes_per_item(per_item),
          batch_ceiling(ceiling),
          weight_budget(budget) {}

    std::uint64_t peak_bytes = 0;               // highest peak of the recent loads (or runs)
    std::uint64_t peak_bytes_per_item = 0;      // highest peak per item of the recent encode chunks
    std::uint64_t batch_ceiling = 0;            // largest batch (items) that last worked
    std::uint64_t weight_budget = 0;            // largest batch weight (tokens...) that last worked
    std::vector<ProfileSample> load_samples;    // oldest first, at most profile_window each
    std::vector<ProfileSample> item_samples;    // encode chunks sized in items
    std::vector<ProfileSample> weight_samples;  // encode chunks sized in weight units

    friend bool operator==(const Profile& a, const Profile& b) noexcept {
        return a.peak_bytes == b.peak_bytes && a.peak_bytes_per_item == b.peak_bytes_per_item &&
               a.batch_ceiling == b.batch_ceiling && a.weight_budget == b.weight_budget &&
               a.load_samples == b.load_samples && a.item_samples == b.item_samples &&
               a.weight_samples == b.weight_samples;
    }
    friend bool operator!=(const Profile& a, const Profile& b) noexcept { return !(a == b); }
};

VRAMGUARD_END_NAMESPACE
