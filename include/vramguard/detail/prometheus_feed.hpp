// SPDX-License-Identifier: MIT
// Pieces of PrometheusExporter (prometheus.hpp): a counter fed from a growing total, and labels.
#pragma once

#include <vramguard/version.hpp>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/labels.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// A prometheus-cpp counter fed from a total that vramguard keeps: only the growth is added.
struct CounterFeed {
    ::prometheus::Counter* counter = nullptr;
    std::uint64_t last = 0;
    void set(std::uint64_t total) {
        if (total > last) counter->Increment(static_cast<double>(total - last));
        last = total;
    }
};

// "busy, idle 3 s (...)" -> "busy": the kind of a peer's last answer (describe()'s first word),
// a label value with few values where the whole sentence would make a series per answer.
inline std::string answer_kind(const std::string& described) {
    return described.substr(0, described.find_first_of(" ,:("));
}

inline ::prometheus::Labels with_label(::prometheus::Labels labels, const std::string& name,
                                       const std::string& value) {
    labels[name] = value;
    return labels;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
