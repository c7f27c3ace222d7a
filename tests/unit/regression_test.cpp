// SPDX-License-Identifier: MIT
// Regression tests from fuzzing (tests/fuzz/, issue #7). The rule: every crash or invariant
// violation a fuzzer finds becomes a test here, named after the fuzzer and the input.
//
// So far (see docs/robustness.md for the runs): the fuzzers found no crash, no sanitizer report
// and no invariant violation. What is pinned here instead are the edge cases the fuzzers and
// their seed corpora were built around: the inputs most likely to break a future change of the
// parsers (cut-short text, numbers at the overflow boundary, non-canonical spellings, embedded NUL
// bytes, names that look like other names). Each mirrors an invariant a fuzzer checks, so a
// failure here is what the fuzzer would report, without the fuzzing time.
#include <vramguard/host.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdint>
#include <limits>
#include <string>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

std::string checksummed(std::string body) {
    body += "checksum " + detail::hex16(detail::fnv1a64(body)) + "\n";
    return body;
}

// ---- fuzz_oom_message ---------------------------------------------------------------------

TEST(FuzzRegressionOomMessage, CutShortMessagesGiveWhatTheyStillSay) {
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate"));
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate "));
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate 20.00 Mi"));  // unit cut
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate .5 GiB"));    // no digits
    const auto cut = parse_oom_message("Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capac");
    ASSERT_TRUE(cut);
    EXPECT_EQ(cut->requested_bytes, 20_MiB);
    ASSERT_TRUE(cut->total_bytes);
    EXPECT_EQ(*cut->total_bytes, static_cast<std::uint64_t>(15.78 * 1073741824.0 + 0.5));
    EXPECT_FALSE(cut->free_bytes);
    // " free" right after the size: nothing before it to read.
    const auto bare = parse_oom_message("Tried to allocate 1 MiB free");
    ASSERT_TRUE(bare);
    EXPECT_FALSE(bare->free_bytes);
}

TEST(FuzzRegressionOomMessage, HugeNumbersAreRejectedNotWrapped) {
    EXPECT_FALSE(parse_oom_message("Tried to allocate 99999999999999999999999999 TiB"));
    EXPECT_FALSE(parse_oom_message("Tried to allocate 18446744073709551615 bytes"));  // >= 1.8e19
    EXPECT_FALSE(parse_oom_message("Tried to allocate 20000000 TiB"));
    const std::string many_digits = "Tried to allocate " + std::string(400, '9') + " bytes";
    EXPECT_FALSE(parse_oom_message(many_digits));
    const auto leading_zeros =
        parse_oom_message("Tried to allocate 0000000000000000000000000001 MiB");
    ASSERT_TRUE(leading_zeros);
    EXPECT_EQ(leading_zeros->requested_bytes, 1_MiB);
    const auto long_fraction =
        parse_oom_message("Tried to allocate 1." + std::string(300, '0') + "1 GiB");
    ASSERT_TRUE(long_fraction);
    EXPECT_EQ(long_fraction->requested_bytes, 1_GiB);
}

TEST(FuzzRegressionOomMessage, EmbeddedNulAndCaseAreHandled) {
    const std::string with_nul("Tried to allocate\0 5 MiB", 24);
    EXPECT_FALSE(parse_oom_message(with_nul));
    const std::string nul_after("x\0Tried to allocate 5 MiB", 25);
    const auto after = parse_oom_message(nul_after);
    ASSERT_TRUE(after);
    EXPECT_EQ(after->requested_bytes, 5_MiB);
    EXPECT_EQ(classify_oom_message("cuda ERROR: OUT OF MEMORY"), OomKind::driver);
    EXPECT_EQ(classify_oom_message(std::string("\xff\0CUDA out of memory\xfe", 22)),
              OomKind::allocator);
    EXPECT_EQ(classify_oom_message("out of memory"), OomKind::none);  // no "tried to allocate"
    EXPECT_EQ(classify_oom_message(""), OomKind::none);
}

TEST(FuzzRegressionOomMessage, SizeParsersStayInsideTheirInput) {
    EXPECT_FALSE(detail::parse_size(""));
    EXPECT_FALSE(detail::parse_size("   "));
    const auto parsed = detail::parse_size("12 B");
    ASSERT_TRUE(parsed);
    EXPECT_EQ(parsed->first, 12u);
    EXPECT_EQ(parsed->second, 4u);
    EXPECT_FALSE(detail::parse_size_before("", 0));
    EXPECT_FALSE(detail::parse_size_before("    ", 4));
    EXPECT_FALSE(detail::parse_size_before("GiB", 3));
    EXPECT_EQ(detail::parse_size_before("(3 GiB", 6), std::optional<std::uint64_t>(3_GiB));
}

// ---- fuzz_profile --------------------------------------------------------------------------

TEST(FuzzRegressionProfile, NonCanonicalNumbersAndLineEndingsAreRejected) {
    const Key key = Key::of("regression");
    const std::string good = detail::serialize_profile(key, Profile{1, 2, 3, 4});
    ASSERT_TRUE(detail::parse_profile(good, key));
    const std::string body = good.substr(0, good.find("checksum "));
    auto with = [&](const std::string& from, const std::string& to) {
        std::string changed = body;
        changed.replace(changed.find(from), from.size(), to);
        return checksummed(changed);
    };
    EXPECT_FALSE(detail::parse_profile(with("peak_bytes 1\n", "peak_bytes 01\n"), key));
    EXPECT_FALSE(detail::parse_profile(with("peak_bytes 1\n", "peak_bytes +1\n"), key));
    EXPECT_FALSE(detail::parse_profile(with("peak_bytes 1\n", "peak_bytes  1\n"), key));
    EXPECT_FALSE(
        detail::parse_profile(with("peak_bytes 1\n", "peak_bytes 18446744073709551616\n"), key));
    EXPECT_FALSE(detail::parse_profile(with("peak_bytes 1\n", "peak_bytes 1\r\n"), key));
    EXPECT_FALSE(detail::parse_profile(with("peak_bytes 1\n", "peak_bytes\n"), key));
    const auto max =
        detail::parse_profile(with("peak_bytes 1\n", "peak_bytes 18446744073709551615\n"), key);
    ASSERT_TRUE(max);
    EXPECT_EQ(max->peak_bytes, std::numeric_limits<std::uint64_t>::max());
    // Upper-case hex, a missing final newline, bytes after the checksum.
    std::string upper = good;
    const std::size_t hex_at = upper.find("key ") + 4;
    for (std::size_t i = hex_at; i < hex_at + 16; ++i)
        upper[i] = static_cast<char>(std::toupper(upper[i]));
    EXPECT_FALSE(detail::parse_profile(upper, key.hex()));
    EXPECT_FALSE(detail::parse_profile(good.substr(0, good.size() - 1), key));
    EXPECT_FALSE(detail::parse_profile(good + "\n", key));
    // Every cut-short prefix is rejected.
    for (std::size_t cut = 0; cut < good.size(); ++cut)
        ASSERT_FALSE(detail::parse_profile(std::string_view(good).substr(0, cut), key)) << cut;
}

TEST(FuzzRegressionProfile, EmptyAndOddKeysRoundTrip) {
    for (const Key& key :
         {Key(), Key::of(""), Key::of(std::string("\0", 1)), Key::of("a\nb", {{"\r", "\n"}}),
          Key::of("{}", {{"=", ","}, {"", ""}})}) {
        const std::string text = detail::serialize_profile(key, Profile{7, 0, 0, 9});
        const auto parsed = detail::parse_profile(text, key);
        ASSERT_TRUE(parsed) << key.label();
        EXPECT_EQ(*parsed, (Profile{7, 0, 0, 9}));
        // Nine lines: magic, key, label, four numbers, "samples 0", checksum.
        EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 9) << key.label();
    }
}

TEST(FuzzRegressionProfile, TempFileNamesAtTheEdges) {
    EXPECT_EQ(detail::temp_file_pid(".tmp"), 0);
    EXPECT_EQ(detail::temp_file_pid("..tmp"), 0);
    EXPECT_EQ(detail::temp_file_pid(".x.0.0.tmp"), 0);                        // pid 0
    EXPECT_EQ(detail::temp_file_pid(".x.2147483648.0.tmp"), 0);               // above INT_MAX
    EXPECT_EQ(detail::temp_file_pid(".x.99999999999999999999999.0.tmp"), 0);  // overflow
    EXPECT_EQ(detail::temp_file_pid(".x.12.01.tmp"), 0);  // non-canonical counter
    EXPECT_EQ(detail::temp_file_pid(".x.-12.1.tmp"), 0);
    EXPECT_EQ(detail::temp_file_pid(".x.2147483647.0.tmp"), INT_MAX);
    EXPECT_EQ(detail::temp_file_pid("..1.0.tmp"), 1);  // empty hex part: still ours by shape
}

// ---- fuzz_key ------------------------------------------------------------------------------

TEST(FuzzRegressionKey, EmptyAndNulNamesAreDistinctKeys) {
    const Key empty_param = Key::of("a", {{"", "x"}});
    const Key nul_param = Key::of("a", {{std::string("\0", 1), "x"}});
    EXPECT_NE(empty_param, nul_param);
    EXPECT_NE(empty_param.label(), nul_param.label());
    EXPECT_NE(Key::of("a"), Key::of("a", {{"", ""}}));  // no parameters vs one empty one
    EXPECT_NE(Key::of("a=b"), Key::of("a", {{"", "b"}}));
    EXPECT_NE(Key::of("a{b=c}"), Key::of("a", {{"b", "c"}}));
    EXPECT_EQ(Key::of("a{b=c}").label(), "a\\{b\\=c\\}");
    // Escapes cannot be forged: a literal backslash-x is not the escape of a byte.
    EXPECT_NE(Key::of("\\x41").label(), Key::of("A").label());
    EXPECT_NE(Key::of("\\x0a").label(), Key::of("\n").label());
}

// ---- fuzz_ledger ---------------------------------------------------------------------------

TEST(FuzzRegressionLedger, OnlyTheCanonicalFormParsesAndItSerializesBackByteForByte) {
    LedgerState state;
    state.device = detail::ledger_device_hash("regression");
    state.boot = "0f3c2a4e-8d1b-4c6a-9e7f-123456789abc";
    state.entries.push_back({0x1122334455667788ULL, 4242, 987654, 6_GiB, 123456789000ULL, 0});
    const std::string good = detail::serialize_ledger(state);
    const auto parsed = detail::parse_ledger(good);
    ASSERT_TRUE(parsed);
    EXPECT_EQ(*parsed, state);
    EXPECT_EQ(detail::serialize_ledger(*parsed), good);
    for (std::size_t cut = 0; cut < good.size(); ++cut)
        ASSERT_FALSE(detail::parse_ledger(std::string_view(good).substr(0, cut))) << cut;
    const std::string body = good.substr(0, good.find("checksum "));
    for (const char* bad : {"reservation 0000000000000001 0 0 1 1 0\n",           // pid 0
                            "reservation 0000000000000001 2147483648 0 1 1 0\n",  // pid > INT_MAX
                            "reservation 0000000000000001 5 0 1 1 0 7\n",         // extra field
                            "reservation 0000000000000001 5 0 1 1\n",             // missing field
                            "reservation 0000000000000001 5 0 01 1 0\n",          // leading zero
                            "reservation 000000000000000G 5 0 1 1 0\n",           // not hex
                            "reservation 0000000000000001  5 0 1 1 0\n",          // double space
                            "reservation 0000000000000001 5 0 1 1 0 \n"})         // trailing space
        EXPECT_FALSE(detail::parse_ledger(checksummed(body + bad))) << bad;
    EXPECT_TRUE(detail::parse_ledger(checksummed(body + "reservation 0000000000000001 2147483647 0 "
                                                        "18446744073709551615 1 0\n")));
}

TEST(FuzzRegressionLedger, InvalidBootIdsAreWrittenAsADash) {
    LedgerState state;
    for (const char* boot : {"", "UPPER", "has space", "new\nline"}) {
        state.boot = boot;
        const auto parsed = detail::parse_ledger(detail::serialize_ledger(state));
        ASSERT_TRUE(parsed) << boot;
        EXPECT_EQ(parsed->boot, "-");
    }
    state.boot = std::string(65, 'a');  // too long
    EXPECT_EQ(detail::parse_ledger(detail::serialize_ledger(state))->boot, "-");
}

}  // namespace
