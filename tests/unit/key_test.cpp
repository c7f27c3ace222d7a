// SPDX-License-Identifier: MIT
#include <vramguard/key.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

using vramguard::Key;
using namespace std::string_literals;

TEST(Fnv1a64, MatchesPublishedTestVectors) {
    EXPECT_EQ(vramguard::detail::fnv1a64(""), 0xcbf29ce484222325ULL);
    EXPECT_EQ(vramguard::detail::fnv1a64("a"), 0xaf63dc4c8601ec8cULL);
    EXPECT_EQ(vramguard::detail::fnv1a64("foobar"), 0x85944171f73967e8ULL);
}

// Changing these breaks every stored profile: profile files are named after these values, on
// every machine and in every run. Only a deliberate new key encoding (a new tag) may change them.
// (Cross-checked against an independent Python implementation of the encoding in key.hpp.)
TEST(Key, PinnedValues) {
    EXPECT_EQ(Key().hex(), "b5775a235c9cc4e0");
    EXPECT_EQ(Key::of("").hex(), "b5775a235c9cc4e0");
    EXPECT_EQ(Key::of("load").hex(), "2a02d6480cd71988");
    const Key encode = Key::of("encode", {{"model", "bge-m3"}, {"dtype", "fp16"}});
    EXPECT_EQ(encode.hex(), "19ad4357ec8ffbd1");
    EXPECT_EQ(encode.value(), 0x19ad4357ec8ffbd1ULL);
    EXPECT_EQ(Key::of("load", {{"model", "llama-3-8b"}, {"device", "0"}, {"quant", "q4"}}).hex(),
              "bb36d92092203e0b");
    EXPECT_EQ(Key::of("x", {{"a", "bc"}}).hex(), "ec4b626c5bcc8f2b");
    EXPECT_EQ(Key::of("x", {{"ab", "c"}}).hex(), "0066a18d9a957f9b");
    EXPECT_EQ(Key::of("bytes\0,={}"s, {{"\0"s, "\xff\n"}}).hex(), "214ae98b43a312b3");
}

TEST(Key, EmptyKeyIsTheKeyOfTheEmptyName) {
    const Key empty;
    EXPECT_EQ(empty, Key::of(""));
    EXPECT_EQ(empty.name(), "");
    EXPECT_EQ(empty.label(), "");
    EXPECT_NE(empty, Key::of("", {{"", ""}}));
}

TEST(Key, ParameterOrderDoesNotMatter) {
    const Key a = Key::of("encode", {{"model", "m"}, {"dtype", "fp16"}, {"max_len", "512"}});
    const Key b = Key::of("encode", {{"max_len", "512"}, {"model", "m"}, {"dtype", "fp16"}});
    const Key c = Key::of("encode", {{"dtype", "fp16"}, {"max_len", "512"}, {"model", "m"}});
    EXPECT_EQ(a, b);
    EXPECT_EQ(a, c);
    EXPECT_EQ(a.value(), b.value());
    EXPECT_EQ(a.label(), "encode{dtype=fp16,max_len=512,model=m}");
    EXPECT_EQ(b.label(), a.label());
}

TEST(Key, VectorOverloadMatchesInitializerList) {
    const std::vector<std::pair<std::string, std::string>> params = {{"b", "2"}, {"a", "1"}};
    EXPECT_EQ(Key::of("n", params), Key::of("n", {{"a", "1"}, {"b", "2"}}));
    EXPECT_EQ(Key::of("n", std::vector<std::pair<std::string, std::string>>{}), Key::of("n"));
}

TEST(Key, DuplicateParameterIsRejectedByName) {
    try {
        Key::of("encode", {{"model", "a"}, {"dtype", "fp16"}, {"model", "b"}});
        FAIL() << "expected std::invalid_argument";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("\"model\""), std::string::npos) << e.what();
    }
    // Same name and same value is still a duplicate.
    EXPECT_THROW(Key::of("x", {{"a", "1"}, {"a", "1"}}), std::invalid_argument);
    const std::vector<std::pair<std::string, std::string>> params = {{"k", "1"}, {"k", "2"}};
    EXPECT_THROW(Key::of("x", params), std::invalid_argument);
}

TEST(Key, BoundariesAreUnambiguous) {
    // Value/name boundary inside a parameter.
    EXPECT_NE(Key::of("x", {{"a", "bc"}}), Key::of("x", {{"ab", "c"}}));
    EXPECT_NE(Key::of("x", {{"a", "bc"}}).value(), Key::of("x", {{"ab", "c"}}).value());
    // Name/parameter boundary.
    EXPECT_NE(Key::of("ab").value(), Key::of("a", {{"b", ""}}).value());
    EXPECT_NE(Key::of("a", {{"b", "c"}}).value(), Key::of("ab", {{"", "c"}}).value());
    // Parameter/parameter boundary.
    EXPECT_NE(Key::of("x", {{"a", "1,b=2"}}).value(),
              Key::of("x", {{"a", "1"}, {"b", "2"}}).value());
    // Separator characters inside strings.
    EXPECT_NE(Key::of("x", {{"a=1", ""}}).value(), Key::of("x", {{"a", "1"}}).value());
    EXPECT_NE(Key::of("x{a=1}").value(), Key::of("x", {{"a", "1"}}).value());
    // NUL bytes count.
    EXPECT_NE(Key::of("a\0"s).value(), Key::of("a").value());
    EXPECT_NE(Key::of("x", {{"k", "\0"s}}).value(), Key::of("x", {{"k", ""}}).value());
    // An empty parameter is not the absence of parameters.
    EXPECT_NE(Key::of("x", {{"", ""}}).value(), Key::of("x").value());
}

TEST(Key, HexIsSixteenLowercaseDigits) {
    for (const Key& key : {Key(), Key::of("a"), Key::of("b", {{"c", "d"}}), Key::of("\xff")}) {
        const std::string hex = key.hex();
        ASSERT_EQ(hex.size(), 16u);
        for (const char c : hex)
            EXPECT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << hex;
        EXPECT_EQ(std::stoull(hex, nullptr, 16), key.value());
    }
    EXPECT_EQ(vramguard::detail::hex16(0), "0000000000000000");
    EXPECT_EQ(vramguard::detail::hex16(0xABCULL), "0000000000000abc");
    EXPECT_EQ(vramguard::detail::hex16(~0ULL), "ffffffffffffffff");
}

TEST(Key, DescribeIsLabelAndHex) {
    const Key key = Key::of("load", {{"model", "m"}});
    EXPECT_EQ(key.name(), "load");
    EXPECT_EQ(key.label(), "load{model=m}");
    EXPECT_EQ(key.describe(), "load{model=m} #" + key.hex());
    EXPECT_EQ(Key::of("load").label(), "load");
}

TEST(Key, LabelEscapesAmbiguousAndUnprintableBytes) {
    EXPECT_EQ(Key::of("a,b", {{"k=", "v,{}"}}).label(), "a\\,b{k\\==v\\,\\{\\}}");
    EXPECT_EQ(Key::of("back\\slash").label(), "back\\\\slash");
    EXPECT_EQ(Key::of("nul\0"s, {{"nl", "a\nb"}}).label(), "nul\\x00{nl=a\\x0ab}");
    EXPECT_EQ(Key::of("\x7f\x80\xff").label(), "\\x7f\\x80\\xff");
    // Distinct keys whose raw text would print the same get distinct labels.
    EXPECT_NE(Key::of("x", {{"a", "1,b=2"}}).label(),
              Key::of("x", {{"a", "1"}, {"b", "2"}}).label());
    EXPECT_NE(Key::of("x{a=1}").label(), Key::of("x", {{"a", "1"}}).label());
    // The name stays raw.
    EXPECT_EQ(Key::of("a,b").name(), "a,b");
}

TEST(Key, UsableInHashedAndOrderedContainers) {
    std::unordered_map<Key, int> counts;
    counts[Key::of("a", {{"x", "1"}, {"y", "2"}})] += 1;
    counts[Key::of("a", {{"y", "2"}, {"x", "1"}})] += 1;
    counts[Key::of("b")] += 1;
    EXPECT_EQ(counts.size(), 2u);
    EXPECT_EQ(counts.at(Key::of("a", {{"x", "1"}, {"y", "2"}})), 2);
    EXPECT_EQ(std::hash<Key>{}(Key::of("b")), static_cast<std::size_t>(Key::of("b").value()));

    std::set<Key> ordered = {Key::of("a"), Key::of("b"), Key::of("a")};
    EXPECT_EQ(ordered.size(), 2u);
    const Key a = Key::of("a"), b = Key::of("b");
    EXPECT_NE(a < b, b < a);
    EXPECT_FALSE(a < a);
}

TEST(Key, CopiesCompareEqual) {
    const Key original = Key::of("n", {{"p", "v"}});
    Key copy = original;
    EXPECT_EQ(copy, original);
    Key moved = std::move(copy);
    EXPECT_EQ(moved, original);
    EXPECT_EQ(moved.hex(), original.hex());
}
