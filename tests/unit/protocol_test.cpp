// SPDX-License-Identifier: MIT
// protocol.hpp: the checks every byte from the network or a peer passes before it is parsed.
#include <vramguard/protocol.hpp>

#include <gtest/gtest.h>

#include <string>

namespace {

using vramguard::protocol::is_valid_utf8;
using vramguard::protocol::json_depth_within;
using vramguard::protocol::printable_excerpt;

TEST(ProtocolJsonDepth, CountsArraysAndObjectsOutsideStrings) {
    struct Row {
        const char* text;
        std::size_t max_depth;
        bool within;
    };
    const Row rows[] = {
        {"", 0, true},
        {"42", 0, true},
        {"[]", 0, false},
        {"[]", 1, true},
        {"{\"a\": [1, {\"b\": 2}]}", 3, true},
        {"{\"a\": [1, {\"b\": 2}]}", 2, false},
        {"[[[", 2, false},             // unbalanced still counts
        {"]]]]]][", 1, true},          // stray closers do not go below zero
        {"\"[[[[[[[[\"", 1, true},     // brackets inside a string
        {"[\"\\\"[[[[\"]", 1, true},   // an escaped quote does not end the string
        {"[\"\\\\\"[[]]]", 2, false},  // an escaped backslash does
    };
    for (const Row& row : rows)
        EXPECT_EQ(json_depth_within(row.text, row.max_depth), row.within)
            << row.text << " max " << row.max_depth;
}

TEST(ProtocolJsonDepth, AMillionLevelsAreRefusedWithoutRecursion) {
    const std::string deep = "{\"min_idle_seconds\": " + std::string(1'000'000, '[') + "]";
    EXPECT_FALSE(json_depth_within(deep, vramguard::protocol::max_json_depth));
    const std::string exact = std::string(64, '[') + std::string(64, ']');
    EXPECT_TRUE(json_depth_within(exact, vramguard::protocol::max_json_depth));
}

TEST(ProtocolUtf8, AcceptsWellFormedAndRefusesEveryKindOfMalformed) {
    struct Row {
        std::string bytes;
        bool valid;
    };
    const Row rows[] = {
        {"", true},
        {"plain ascii", true},
        {"caf\xC3\xA9", true},       // U+00E9
        {"\xE2\x82\xAC", true},      // U+20AC
        {"\xF0\x9F\x98\x80", true},  // U+1F600
        {"\xF4\x8F\xBF\xBF", true},  // U+10FFFF
        {"\xFF", false},
        {"\xC3", false},              // cut short
        {"\xC0\xAF", false},          // overlong '/'
        {"\xE0\x80\xAF", false},      // overlong, three bytes
        {"\xED\xA0\x80", false},      // a surrogate
        {"\xF4\x90\x80\x80", false},  // above U+10FFFF
        {"\xF5\x80\x80\x80", false},
        {"a\x80z", false},                       // a lone continuation byte
        {std::string("nul\0inside", 10), true},  // NUL is a valid code point
    };
    for (const Row& row : rows) EXPECT_EQ(is_valid_utf8(row.bytes), row.valid) << row.bytes;
}

TEST(ProtocolExcerpt, ReplacesMalformedBytesAndControlsAndCuts) {
    EXPECT_EQ(printable_excerpt("/encode"), "/encode");
    EXPECT_EQ(printable_excerpt("/\xFF\xC3x"), "/??x");
    EXPECT_EQ(printable_excerpt("caf\xC3\xA9"), "caf\xC3\xA9");
    EXPECT_EQ(printable_excerpt("a\nb\x1b[31m"), "a?b?[31m");
    EXPECT_EQ(printable_excerpt(std::string(300, 'x'), 10), std::string(10, 'x') + "...");
    // A multi-byte character that would cross the limit is left out whole.
    EXPECT_EQ(printable_excerpt("abc\xE2\x82\xAC", 5), "abc...");
    EXPECT_TRUE(is_valid_utf8(printable_excerpt("\xED\xA0\x80\xF4\x90\x80\x80")));
}

}  // namespace
