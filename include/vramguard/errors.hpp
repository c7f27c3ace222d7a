// SPDX-License-Identifier: MIT
// Errors a caller handles, and the answer to "was that an out-of-memory?".
//
// Classification is by type first and by message second: LibTorch raises c10::OutOfMemoryError only
// since 1.13 and wraps many allocator failures in a plain c10::Error, and its message has had two
// formats (one with the typo "capacty") and may be cut short. Backends add their own types through
// register_oom_classifier(). Anything that is not recognised is not an OOM and is never retried.
#pragma once

#include <vramguard/detail/oom_text.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeindex>
#include <typeinfo>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

enum class OomKind {
    none,       // not an out-of-memory error
    allocator,  // an allocation failed; the process is healthy and may retry with less
    driver,     // "CUDA error: out of memory" from outside the allocator: the CUDA context may be
                // unusable, so it is reported, not retried blindly
};

// What an OOM said about itself, when it said it.
struct OomReport {
    std::uint64_t requested_bytes = 0;
    std::optional<std::uint64_t> free_bytes;
    std::optional<std::uint64_t> total_bytes;
};

// vramguard's own OOM (thrown by SimulatedDevice and by the CUDA backend's checked calls).
class OutOfMemory : public std::runtime_error {
   public:
    explicit OutOfMemory(const std::string& message, OomKind kind = OomKind::allocator,
                         std::optional<OomReport> report = std::nullopt)
        : std::runtime_error(message), kind_(kind), report_(report) {}
    OomKind kind() const noexcept { return kind_; }
    const std::optional<OomReport>& report() const noexcept { return report_; }

   private:
    OomKind kind_;
    std::optional<OomReport> report_;
};

// A backend asked for a device that is not there (no driver, no GPU, bad index).
class DeviceUnavailable : public std::runtime_error {
   public:
    DeviceUnavailable(const std::string& message, int error_code = 0)
        : std::runtime_error(message), error_code_(error_code) {}
    int error_code() const noexcept { return error_code_; }

   private:
    int error_code_;
};

// Admission said no: the work needs more than this process can get now.
class InsufficientMemory : public std::runtime_error {
   public:
    InsufficientMemory(std::uint64_t required, std::uint64_t available, std::uint64_t total,
                       std::string key, std::chrono::milliseconds retry_after,
                       const std::string& message, bool can_never_fit = false)
        : std::runtime_error(message),
          required_(required),
          available_(available),
          total_(total),
          key_(std::move(key)),
          retry_after_(retry_after),
          can_never_fit_(can_never_fit) {}

    std::uint64_t required() const noexcept { return required_; }    // bytes, margin included
    std::uint64_t available() const noexcept { return available_; }  // bytes this process could get
    std::uint64_t total() const noexcept { return total_; }          // device size
    const std::string& key() const noexcept { return key_; }         // "name{params} #hex"
    // A hint for a 503's Retry-After: how long memory took to come back before, or the retry delay.
    std::chrono::milliseconds retry_after() const noexcept { return retry_after_; }
    // The work needs more than the whole device even with nothing else on it: waiting will not
    // help, so a server answers 507 or 413 instead of 503, and a client does not come back.
    bool can_never_fit() const noexcept { return can_never_fit_; }

   private:
    std::uint64_t required_, available_, total_;
    std::string key_;
    std::chrono::milliseconds retry_after_;
    bool can_never_fit_;
};

// The work ran out of memory even at its smallest: a load after every attempt, or one encode item
// alone. The last OOM is nested (std::rethrow_if_nested). Results finished before the failing item
// stay reachable through finished_results<R>().
class OomExhausted : public std::runtime_error, public std::nested_exception {
   public:
    OomExhausted(const std::string& message, std::string key, std::optional<std::size_t> item_index,
                 unsigned attempts)
        : std::runtime_error(message),
          key_(std::move(key)),
          item_index_(item_index),
          attempts_(attempts) {}

    const std::string& key() const noexcept { return key_; }
    // Index (in the caller's input) of the item that failed alone; empty for a load.
    std::optional<std::size_t> item_index() const noexcept { return item_index_; }
    unsigned attempts() const noexcept { return attempts_; }

    template <class R>
    void keep_finished_results(std::vector<R> results) {
        results_ = std::make_shared<std::vector<R>>(std::move(results));
        results_type_ = typeid(std::vector<R>);
    }
    // The results of every item before item_index(), in input order. Throws std::bad_cast when R
    // is not the batch function's result type.
    template <class R>
    const std::vector<R>& finished_results() const {
        if (!results_ || results_type_ != std::type_index(typeid(std::vector<R>)))
            throw std::bad_cast();
        return *static_cast<const std::vector<R>*>(results_.get());
    }

   private:
    std::string key_;
    std::optional<std::size_t> item_index_;
    unsigned attempts_;
    std::shared_ptr<const void> results_;
    std::type_index results_type_{typeid(void)};
};

// Reads the numbers out of a PyTorch/CUDA/CPU OOM message, in any of its historical formats:
//   "Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; ...; 3.75 MiB free; ...)"
//   "Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB of which 12.75 MiB is
//   free." "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000 bytes."
//   "Allocation on device 0 would exceed allowed memory. (out of memory)\nCurrently allocated
//   : 22.43 GiB\nRequested : 4.07 GiB\nDevice limit : 16.00 GiB\nFree (according to CUDA): 0
//   bytes" (the cudaMallocAsync backend)
// Returns nothing when not even the requested size can be read.
inline std::optional<OomReport> parse_oom_message(std::string_view message) noexcept {
    const std::size_t tried = detail::find_nocase(message, "tried to allocate");
    if (tried == std::string_view::npos) {
        if (!detail::contains_nocase(message, "would exceed allowed memory")) return std::nullopt;
        const auto requested = detail::parse_labelled_size(message, "Requested");
        if (!requested) return std::nullopt;
        OomReport report;
        report.requested_bytes = *requested;
        report.free_bytes = detail::parse_labelled_size(message, "Free (according to CUDA)");
        report.total_bytes = detail::parse_labelled_size(message, "Device limit");
        return report;
    }
    auto requested = detail::parse_size(message.substr(tried + 17));
    if (!requested) return std::nullopt;
    OomReport report;
    report.requested_bytes = requested->first;
    const std::string_view rest = message.substr(tried + 17 + requested->second);

    const std::size_t of_which = detail::find_nocase(rest, "of which");
    if (of_which != std::string_view::npos) {
        if (auto free = detail::parse_size(rest.substr(of_which + 8)))
            report.free_bytes = free->first;
    } else {
        const std::size_t free_word = detail::find_nocase(rest, " free");
        if (free_word != std::string_view::npos)
            report.free_bytes = detail::parse_size_before(rest, free_word);
    }
    const std::size_t capacity_of = detail::find_nocase(rest, "total capacity of");
    if (capacity_of != std::string_view::npos) {
        if (auto total = detail::parse_size(rest.substr(capacity_of + 17)))
            report.total_bytes = total->first;
    } else {
        // "total capacity" and the historical typo "total capacty".
        const std::size_t total_word = detail::find_nocase(rest, " total capac");
        if (total_word != std::string_view::npos)
            report.total_bytes = detail::parse_size_before(rest, total_word);
    }
    return report;
}

// Classifies an error message; used for exception types no classifier knows.
inline OomKind classify_oom_message(std::string_view message) noexcept {
    // The driver-level failure ("CUDA error: out of memory", cudaErrorMemoryAllocation raised
    // outside the caching allocator) is checked first: its context may be broken.
    if (detail::contains_nocase(message, "CUDA error: out of memory") ||
        detail::contains_nocase(message, "cudaErrorMemoryAllocation"))
        return OomKind::driver;
    if (detail::contains_nocase(message, "CUDA out of memory") ||
        detail::contains_nocase(message, "DefaultCPUAllocator: can't allocate memory") ||
        detail::contains_nocase(message, "DefaultCPUAllocator: not enough memory") ||
        detail::contains_nocase(message, "HIP out of memory") ||
        detail::contains_nocase(message, "MPS backend out of memory") ||
        detail::contains_nocase(message, "would exceed allowed memory") ||
        (detail::contains_nocase(message, "out of memory") &&
         detail::contains_nocase(message, "tried to allocate")))
        return OomKind::allocator;
    return OomKind::none;
}

// A classifier looks at one exception and says what it is; OomKind::none means "not mine".
using OomClassifier = OomKind (*)(const std::exception_ptr&);

// Adds a classifier (idempotent). Backends register theirs from an inline variable, so including
// cuda.hpp or torch.hpp is all it takes. Returns true, for use in such initialisers.
inline bool register_oom_classifier(OomClassifier classifier) {
    auto& registry = detail::classifier_registry<OomKind>();
    std::lock_guard<std::mutex> lock(registry.mutex);
    if (std::find(registry.classifiers.begin(), registry.classifiers.end(), classifier) ==
        registry.classifiers.end())
        registry.classifiers.push_back(classifier);
    return true;
}

// A text reader gives an exception's message without what its library appends to what() (c10's
// backtrace: dozens of "frame #N" lines that log aggregators split into as many events); nullptr
// means "not mine". torch.hpp registers LibTorch's (c10::Error::what_without_backtrace()).
using ErrorTextReader = const char* (*)(const std::exception_ptr&);

// Adds a text reader (idempotent); returns true, for use in an inline variable's initialiser.
inline bool register_error_text_reader(ErrorTextReader reader) {
    auto& registry = detail::classifier_registry<OomKind>();
    std::lock_guard<std::mutex> lock(registry.mutex);
    if (std::find(registry.text_readers.begin(), registry.text_readers.end(), reader) ==
        registry.text_readers.end())
        registry.text_readers.push_back(reader);
    return true;
}

inline OomKind classify_oom(const std::exception_ptr& error) {
    if (!error) return OomKind::none;
    try {
        std::rethrow_exception(error);
    } catch (const OutOfMemory& oom) {
        return oom.kind();
    } catch (const std::bad_alloc&) {
        return OomKind::allocator;  // host memory: the CPU inference case
    } catch (...) {
    }
    std::vector<OomClassifier> classifiers;
    {
        auto& registry = detail::classifier_registry<OomKind>();
        std::lock_guard<std::mutex> lock(registry.mutex);
        classifiers = registry.classifiers;
    }
    for (OomClassifier classifier : classifiers) {
        const OomKind kind = classifier(error);
        if (kind != OomKind::none) return kind;
    }
    try {
        std::rethrow_exception(error);
    } catch (const std::exception& e) {
        return classify_oom_message(e.what());
    } catch (...) {
        return OomKind::none;
    }
}

inline bool is_oom(std::exception_ptr error) { return classify_oom(error) != OomKind::none; }

// Throws what `make()` returns with `cause` nested in it, also outside a catch block: the
// exception is made inside one, where std::nested_exception captures the cause.
template <class Make>
[[noreturn]] void throw_with_cause(const std::exception_ptr& cause, Make&& make) {
    try {
        std::rethrow_exception(cause);
    } catch (...) {
        std::throw_with_nested(make());
    }
}

// The numbers an OOM carried: from OutOfMemory's own report, else parsed from what().
inline std::optional<OomReport> oom_report(const std::exception_ptr& error) {
    try {
        std::rethrow_exception(error);
    } catch (const OutOfMemory& oom) {
        if (oom.report()) return oom.report();
        return parse_oom_message(oom.what());
    } catch (const std::exception& e) {
        return parse_oom_message(e.what());
    } catch (...) {
        return std::nullopt;
    }
}

// The message of an error without a backtrace its library appended: a registered reader's text
// (LibTorch: what_without_backtrace()), else what() cut before c10's "Exception raised from".
inline std::string error_text(const std::exception_ptr& error) {
    if (!error) return "no exception";
    std::vector<ErrorTextReader> readers;
    {
        auto& registry = detail::classifier_registry<OomKind>();
        std::lock_guard<std::mutex> lock(registry.mutex);
        readers = registry.text_readers;
    }
    for (ErrorTextReader reader : readers)
        if (const char* text = reader(error)) return text;
    std::string text;
    try {
        std::rethrow_exception(error);
    } catch (const std::exception& e) {
        text = e.what();
    } catch (...) {
        return "unknown exception";
    }
    const std::size_t backtrace = text.find("\nException raised from ");
    if (backtrace != std::string::npos) text.resize(backtrace);
    return text;
}

// One line for a log or for vramguard's own error messages: error_text() with every line break
// folded into a space (a log aggregator splits lines into events), at most 400 characters. The
// whole exception stays reachable: vramguard's errors nest it (std::rethrow_if_nested).
inline std::string describe(const std::exception_ptr& error) {
    std::string text = error_text(error);
    std::string line;
    line.reserve(text.size());
    bool folding = false;  // inside a line break and the blanks around it
    for (const char c : text) {
        const bool blank = c == ' ' || c == '\t';
        if (c == '\n' || c == '\r') {
            while (!line.empty() && (line.back() == ' ' || line.back() == '\t')) line.pop_back();
            folding = true;
        } else if (!(folding && blank)) {
            if (folding && !line.empty()) line.push_back(' ');
            folding = false;
            line.push_back(c);
        }
    }
    constexpr std::size_t limit = 400;
    if (line.size() > limit) line = line.substr(0, limit) + "...";
    return line;
}

VRAMGUARD_END_NAMESPACE
