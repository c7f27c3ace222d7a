// SPDX-License-Identifier: MIT
// The examples/torch_server binary serving a user's model: a TorchScript file and a SentencePiece
// tokenizer, both made here at test time (torch::jit::Module::define + register_parameter + save;
// SentencePieceTrainer::Train on generated text: no download, no Python). Checks that /encode
// answers what the module itself gives for the same token ids, alone and inside mixed-length
// batches, for a module that pools ([B,D]) and one whose per-token states the server mean-pools
// ([B,T,D]); that a missing or corrupt file, or a module with another forward, stops the server at
// start with one line and a non-zero status; that a model too large for the (simulated) device is
// 507 and one that does not fit now 503; and the command line: every flag from the environment
// (VRAMGUARD_SERVER_*), the token from a file, the generated --help. Every wait has a deadline;
// every server started is killed when its test ends.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <torch/script.h>
#include <torch/torch.h>

#include "server_process.hpp"
#include "temp_dir.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// SentencePiece runs in a tool of its own (tests/torch/sentencepiece_tool.cpp): it cannot share a
// process with LibTorch (examples/torch_server/sentencepiece/sentencepiece_shim.h).
#ifndef VRAMGUARD_SENTENCEPIECE_TOOL_PATH
#error \
    "VRAMGUARD_SENTENCEPIECE_TOOL_PATH must name sentencepiece_tool (tests/CMakeLists.txt sets it)"
#endif

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

using Env = vramguard_test::ServerProcess::Env;

using vramguard_test::encode;
using vramguard_test::max_difference;
using vramguard_test::post;
using vramguard_test::Reply;
using vramguard_test::ServerProcess;

std::unique_ptr<httplib::Client> client_of(const ServerProcess& server) {
    return vramguard_test::client_of(server.port());
}

json status_of(httplib::Client& client) { return vramguard_test::get(client, "/status").body; }

void write_file(const std::string& path, const std::string& content) {
    std::ofstream(path, std::ios::binary) << content;
}

// --- the pieces a user brings, made here ---------------------------------------------------------

constexpr std::int64_t vocab = 400;  // >= the tokenizer's pieces
constexpr std::int64_t width = 24;

// A module with the server's contract. Pooled: its own masked mean, then a projection ([B,D]).
// Token states: a running sum along the text (each state depends on the tokens before it, and the
// padding positions get states too, which the server must leave out of its mean) ([B,T,D]).
torch::jit::Module make_module(bool pooled) {
    torch::jit::Module module("EmbedderForTest");
    torch::manual_seed(20);
    module.register_parameter("table", torch::randn({vocab, width}), false);
    module.register_parameter("mix", torch::randn({width, width}) / std::sqrt(width), false);
    if (pooled)
        module.define(R"(
def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    x = torch.embedding(self.table, input_ids)
    keep = attention_mask.unsqueeze(-1).type_as(x)
    mean = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
    return torch.tanh(torch.matmul(mean, self.mix))
)");
    else
        module.define(R"(
def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    x = torch.embedding(self.table, input_ids)
    return torch.tanh(torch.matmul(torch.cumsum(x, dim=1), self.mix))
)");
    return module;
}

// A few hundred lines of generated text over a small made-up vocabulary.
std::string training_text() {
    const std::vector<std::string> words = {
        "guard",  "memory", "device", "model",  "encode", "tensor",  "batch",   "token",
        "server", "peer",   "unload", "idle",   "budget", "learned", "profile", "admission",
        "the",    "a",      "of",     "and",    "runs",   "fits",    "waits",   "frees",
        "graph",  "kernel", "cache",  "stream", "queue",  "request", "answer",  "quickly"};
    std::string text;
    std::uint32_t state = 12345;
    for (int line = 0; line < 400; ++line) {
        const int length = 4 + line % 11;
        for (int w = 0; w < length; ++w) {
            state = state * 1664525u + 1013904223u;
            text += words[(state >> 16) % words.size()];
            text += w + 1 < length ? " " : ".\n";
        }
    }
    return text;
}

// The model files every test shares, made once.
struct Pieces {
    vramguard_test::TempDir dir{"torch-server-model-test-"};
    std::string pooled, states, tokenizer;

    Pieces() {
        pooled = dir.path() + "/pooled.pt";
        states = dir.path() + "/states.pt";
        make_module(true).save(pooled);
        make_module(false).save(states);
        const std::string corpus = dir.path() + "/corpus.txt";
        write_file(corpus, training_text());
        const std::string command =
            std::string(VRAMGUARD_SENTENCEPIECE_TOOL_PATH) + " train '--input=" + corpus +
            " --model_prefix=" + dir.path() +
            "/spiece --vocab_size=120 --model_type=unigram --character_coverage=1.0 "
            "--hard_vocab_limit=false --num_threads=1 --minloglevel=2' 2>/dev/null";
        if (std::system(command.c_str()) != 0)
            throw std::runtime_error("SentencePiece training failed: " + command);
        tokenizer = dir.path() + "/spiece.model";
    }
};

const Pieces& pieces() {
    static const Pieces made;
    return made;
}

// SentencePiece's ids for one text, from the tool.
std::vector<int> sentencepiece_ids(const std::string& text) {
    static std::map<std::string, std::vector<int>> seen;
    if (auto it = seen.find(text); it != seen.end()) return it->second;
    const std::string input = pieces().dir.path() + "/text.txt";
    write_file(input, text + "\n");
    const std::string command = std::string(VRAMGUARD_SENTENCEPIECE_TOOL_PATH) + " encode " +
                                pieces().tokenizer + " < " + input;
    FILE* pipe = ::popen(command.c_str(), "r");
    if (!pipe) throw std::runtime_error("popen: " + command);
    std::string line;
    char buffer[4096];
    while (std::fgets(buffer, sizeof buffer, pipe)) line += buffer;
    if (::pclose(pipe) != 0) throw std::runtime_error("failed: " + command);
    std::vector<int> ids;
    std::istringstream in(line);
    for (int id; in >> id;) ids.push_back(id);
    return seen[text] = ids;
}

// What the module gives for one text, called directly: the ids the server is configured to make
// (--bos-id 1 --eos-id 2 around SentencePiece's pieces), a mask of ones, the mean over the tokens
// of a [1,T,D] output.
std::vector<float> direct_embedding(const std::string& model_path, const std::string& text,
                                    std::size_t max_tokens = 512) {
    const std::vector<int> ids = sentencepiece_ids(text);
    std::vector<std::int64_t> tokens = {1};
    for (std::size_t i = 0; i < ids.size() && tokens.size() + 1 < max_tokens; ++i)
        tokens.push_back(ids[i]);
    tokens.push_back(2);
    const auto n = static_cast<std::int64_t>(tokens.size());
    torch::jit::Module module = torch::jit::load(model_path);
    module.eval();
    torch::NoGradGuard no_grad;
    torch::Tensor out =
        module.forward({torch::tensor(tokens).reshape({1, n}), torch::ones({1, n}, torch::kInt64)})
            .toTensor();
    if (out.dim() == 3) out = out.mean(1);
    out = out.contiguous();
    return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.size(1));
}

constexpr float tolerance = 1e-5f;

std::vector<std::string> model_args(const std::string& model, const std::string& profiles) {
    return {"--model", model,      "--tokenizer", pieces().tokenizer, "--bos-id", "1", "--eos-id",
            "2",       "--pad-id", "0",           "--profile-dir",    profiles};
}

std::vector<std::string> mixed_texts() {
    return {"the guard frees memory", "a", "",
            "the server runs the model and the profile waits quickly for the kernel queue and "
            "the cache of the stream answers every request of the batch",
            "unload idle peer"};
}

// --- serving the module -----------------------------------------------------------------------

void expect_server_matches_module(const std::string& model) {
    vramguard_test::TempDir profiles{"torch-server-model-test-"};
    ServerProcess server(model_args(model, profiles.path()));
    ASSERT_GT(server.port(), 0) << server.err();
    auto client = client_of(server);
    const std::vector<std::string> texts = mixed_texts();

    for (const std::string& text : texts) {
        const Reply alone = encode(*client, {text});
        ASSERT_EQ(alone.status, 200) << alone.body.dump();
        EXPECT_EQ(alone.body["dim"].get<int>(), width);
        const auto got = alone.body["embeddings"][0].get<std::vector<float>>();
        EXPECT_LE(max_difference(got, direct_embedding(model, text)), tolerance) << text;
    }
    // Every text inside one padded batch (and the batch twice over, shuffled): padding must not
    // change an embedding.
    std::vector<std::string> batch = texts;
    batch.insert(batch.end(), texts.rbegin(), texts.rend());
    const Reply together = encode(*client, batch);
    ASSERT_EQ(together.status, 200) << together.body.dump();
    const auto rows = together.body["embeddings"].get<std::vector<std::vector<float>>>();
    ASSERT_EQ(rows.size(), batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i)
        EXPECT_LE(max_difference(rows[i], direct_embedding(model, batch[i])), tolerance)
            << "texts[" << i << "] = \"" << batch[i] << "\"";

    const json status = status_of(*client);
    EXPECT_TRUE(status["model"]["loaded"].get<bool>());
    EXPECT_EQ(status["model"]["dim"].get<int>(), width);
    EXPECT_NE(status["model"]["source"].get<std::string>().find(model), std::string::npos);
    EXPECT_EQ(status["model"]["declared_bytes"].get<std::uint64_t>(),
              static_cast<std::uint64_t>((vocab * width + width * width) * sizeof(float)));
    EXPECT_EQ(status["requests"]["failed_500"].get<int>(), 0);
    EXPECT_EQ(server.stop() >> 8, 0);
}

TEST(TorchServerModel, PooledModuleAnswersWhatTheModuleGivesAloneAndInMixedBatches) {
    expect_server_matches_module(pieces().pooled);
}

TEST(TorchServerModel, TokenStatesAreMeanPooledOverTheMaskOnly) {
    expect_server_matches_module(pieces().states);
}

TEST(TorchServerModel, MaxTokensCutsTextsAndKeepsTheEndToken) {
    vramguard_test::TempDir profiles{"torch-server-model-test-"};
    auto args = model_args(pieces().states, profiles.path());
    args.insert(args.end(), {"--max-tokens", "6"});
    ServerProcess server(args);
    ASSERT_GT(server.port(), 0) << server.err();
    auto client = client_of(server);
    const std::string text = mixed_texts()[3];
    const Reply reply = encode(*client, {text, "a"});
    ASSERT_EQ(reply.status, 200) << reply.body.dump();
    const auto got = reply.body["embeddings"][0].get<std::vector<float>>();
    EXPECT_LE(max_difference(got, direct_embedding(pieces().states, text, 6)), tolerance);
    EXPECT_GT(max_difference(got, direct_embedding(pieces().states, text)), 1e-3f)
        << "the cut must change a long text's embedding";
}

// The file's content is in the profile key: a re-export at the same path learns afresh.
TEST(TorchServerModel, TheKeyFollowsTheFilesContent) {
    vramguard_test::TempDir work{"torch-server-model-test-"};
    const std::string path = work.path() + "/model.pt";
    auto key_of = [&](const std::string& dtype) {
        ServerProcess server({"--model", path, "--dtype", dtype, "--tokenizer", pieces().tokenizer,
                              "--profile-dir", work.path()});
        EXPECT_GT(server.port(), 0) << server.err();
        if (server.port() <= 0) return std::string();
        return status_of(*client_of(server))["encode"]["key"].get<std::string>();
    };
    make_module(true).save(path);
    const std::string first = key_of("float32");
    EXPECT_EQ(key_of("float32"), first) << "the same file, the same key";
    EXPECT_NE(key_of("bfloat16"), first) << "another dtype, other costs";
    make_module(false).save(path);
    EXPECT_NE(key_of("float32"), first) << "a re-export at the same path";
}

// --- files that cannot be served: one line, a non-zero exit, before listening ---------------

void expect_refused_at_start(const std::vector<std::string>& args, const std::string& wanted) {
    vramguard_test::TempDir profiles{"torch-server-model-test-"};
    std::vector<std::string> all = args;
    all.insert(all.end(), {"--profile-dir", profiles.path()});
    ServerProcess server(all);
    EXPECT_LT(server.port(), 0);
    const int status = server.wait_exit();
    ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status << "\n" << server.err();
    EXPECT_EQ(WEXITSTATUS(status), 1) << server.err();
    const std::string& err = server.err();
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << "one line:\n" << err;
    EXPECT_EQ(err.rfind("torch_server: ", 0), 0u) << err;
    EXPECT_NE(err.find(wanted), std::string::npos) << "wanted \"" << wanted << "\" in\n" << err;
    EXPECT_EQ(err.find("frame #"), std::string::npos) << err;
    EXPECT_EQ(err.find("Exception raised from"), std::string::npos) << err;
}

TEST(TorchServerModel, AMissingOrCorruptModelFileStopsTheStartWithOneLine) {
    vramguard_test::TempDir work{"torch-server-model-test-"};
    const std::string missing = work.path() + "/missing.pt";
    expect_refused_at_start({"--model", missing}, missing + ": No such file or directory");
    const std::string corrupt = work.path() + "/corrupt.pt";
    write_file(corrupt, std::string(4096, '\x7f') + "not a zip archive");
    expect_refused_at_start({"--model", corrupt},
                            corrupt + ": not a TorchScript file torch::jit::load can read");
    // The first half of a real file: a truncated download.
    std::ifstream in(pieces().pooled, std::ios::binary);
    const std::string whole((std::istreambuf_iterator<char>(in)), {});
    const std::string truncated = work.path() + "/truncated.pt";
    write_file(truncated, whole.substr(0, whole.size() / 2));
    expect_refused_at_start({"--model", truncated},
                            truncated + ": not a TorchScript file torch::jit::load can read");
}

TEST(TorchServerModel, AnotherSignatureIsNamedInTheError) {
    vramguard_test::TempDir work{"torch-server-model-test-"};
    auto save = [&](const std::string& name, const std::string& source) {
        torch::jit::Module module("Other");
        module.register_parameter("table", torch::randn({vocab, width}), false);
        module.define(source);
        const std::string path = work.path() + "/" + name + ".pt";
        module.save(path);
        return path;
    };
    const std::string one_input = save("one_input", R"(
def forward(self, input_ids: Tensor) -> Tensor:
    return torch.embedding(self.table, input_ids).mean(1)
)");
    expect_refused_at_start({"--model", one_input},
                            "its forward is forward(__torch__.Other self, Tensor input_ids) -> "
                            "Tensor; torch_server needs forward(input_ids: Tensor[B,T] int64");
    const std::string pair = save("pair", R"(
def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
    x = torch.embedding(self.table, input_ids)
    return x, attention_mask
)");
    expect_refused_at_start({"--model", pair}, "-> ((Tensor, Tensor)); torch_server needs");
    const std::string flat = save("flat", R"(
def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return torch.embedding(self.table, input_ids).sum(2).sum(1)
)");
    expect_refused_at_start({"--model", flat, "--tokenizer", pieces().tokenizer},
                            ": forward returned Tensor[2] float for input_ids");
    // The right signature, but the built-in tokenizer's ids (up to 8191) overrun its 400-row
    // table: the probe says so at start, not the first request.
    expect_refused_at_start(
        {"--model", pieces().pooled},
        ": forward failed on a probe batch of Tensor[2, 9] long int (on the CPU): "
        "RuntimeError: index out of range in self");
}

TEST(TorchServerModel, AMissingOrCorruptTokenizerStopsTheStartWithOneLine) {
    vramguard_test::TempDir work{"torch-server-model-test-"};
    const std::string missing = work.path() + "/missing.model";
    expect_refused_at_start({"--tokenizer", missing},
                            missing + ": not a SentencePiece model SentencePieceProcessor::Load");
    const std::string corrupt = work.path() + "/corrupt.model";
    write_file(corrupt, "\x0a\xff\xff\xff\xff garbage");
    expect_refused_at_start({"--tokenizer", corrupt},
                            corrupt + ": not a SentencePiece model SentencePieceProcessor::Load");
    expect_refused_at_start({"--tokenizer", pieces().tokenizer, "--eos-id", "5000"},
                            "--eos-id 5000 is not an id of " + pieces().tokenizer);
}

// --- a model that does not fit: the documented 507 and 503 ------------------------------------

TEST(TorchServerModel, AModelLargerThanTheDeviceIs507AndOneThatDoesNotFitNowIs503) {
    vramguard_test::TempDir profiles{"torch-server-model-test-"};
    {
        auto args = model_args(pieces().pooled, profiles.path());
        args.insert(args.end(), {"--model-bytes", "4000000", "--memory-limit-bytes", "1000000"});
        ServerProcess server(args);
        ASSERT_GT(server.port(), 0) << server.err();
        const Reply reply = encode(*client_of(server), {"no room for me"});
        EXPECT_EQ(reply.status, 507) << reply.body.dump();
        EXPECT_EQ(reply.retry_after, "");
        EXPECT_TRUE(reply.body["can_never_fit"].get<bool>());
        EXPECT_GE(reply.body["required_bytes"].get<std::uint64_t>(), 4000000u);
    }
    {
        // A 64 MB device another process holds 63 MB of: 2 MB does not fit now.
        auto args = model_args(pieces().pooled, profiles.path());
        args.insert(args.end(), {"--model-bytes", "2000000", "--memory-limit-bytes", "64000000",
                                 "--simulate-other-process-bytes", "63000000"});
        ServerProcess server(args);
        ASSERT_GT(server.port(), 0) << server.err();
        const Reply reply = encode(*client_of(server), {"no room for me yet"});
        EXPECT_EQ(reply.status, 503) << reply.body.dump();
        EXPECT_FALSE(reply.retry_after.empty());
        EXPECT_FALSE(reply.body["can_never_fit"].get<bool>());
    }
}

// --- the command line --------------------------------------------------------------------------

TEST(TorchServerCommandLine, EveryFlagAlsoComesFromTheEnvironment) {
    vramguard_test::TempDir profiles{"torch-server-model-test-"};
    const Env env = {{"VRAMGUARD_SERVER_MODEL", pieces().states},
                     {"VRAMGUARD_SERVER_TOKENIZER", pieces().tokenizer},
                     {"VRAMGUARD_SERVER_BOS_ID", "1"},
                     {"VRAMGUARD_SERVER_EOS_ID", "2"},
                     {"VRAMGUARD_SERVER_MAX_TEXTS", "7"},  // the command line below wins: 3
                     {"VRAMGUARD_SERVER_IDLE_UNLOAD_SECONDS", "0"},
                     {"VRAMGUARD_SERVER_PROFILE_DIR", profiles.path()},
                     {"VRAMGUARD_SERVER_UNLOAD_TOKEN", "s3cret-from-env"}};
    ServerProcess server({"--max-texts", "3"}, env);
    ASSERT_GT(server.port(), 0) << server.err();
    auto client = client_of(server);
    const Reply reply = encode(*client, {"the guard frees memory"});
    ASSERT_EQ(reply.status, 200) << reply.body.dump();
    EXPECT_LE(max_difference(reply.body["embeddings"][0].get<std::vector<float>>(),
                             direct_embedding(pieces().states, "the guard frees memory")),
              tolerance);
    EXPECT_EQ(encode(*client, {"a", "b", "c", "d"}).status, 400) << "--max-texts 3 wins";
    const json status = status_of(*client);
    EXPECT_FALSE(status["auto_unload_enabled"].get<bool>());
    EXPECT_NE(status["model"]["source"].get<std::string>().find(pieces().states),
              std::string::npos);
    // The token came from the environment: a wrong one is refused, the right one accepted.
    EXPECT_EQ(post(*client, "/request-unload?min_idle_seconds=0", "{}",
                   {{"Authorization", "Bearer wrong"}})
                  .status,
              401);
    const Reply unload = post(*client, "/request-unload?min_idle_seconds=0", "{}",
                              {{"Authorization", "Bearer s3cret-from-env"}});
    EXPECT_EQ(unload.status, 200) << unload.body.dump();
    EXPECT_TRUE(unload.body["unloaded"].get<bool>()) << unload.body.dump();
}

TEST(TorchServerCommandLine, TheTokenComesFromAFile) {
    vramguard_test::TempDir work{"torch-server-model-test-"};
    const std::string file = work.path() + "/token";
    write_file(file, "t0ken-in-a-file\n");
    ServerProcess server({"--unload-token-file", file, "--profile-dir", work.path()});
    ASSERT_GT(server.port(), 0) << server.err();
    auto client = client_of(server);
    EXPECT_EQ(post(*client, "/request-unload", "{}", {{"Authorization", "Bearer wrong"}}).status,
              401);
    EXPECT_EQ(post(*client, "/request-unload", "{}", {{"Authorization", "Bearer t0ken-in-a-file"}})
                  .status,
              200);
    // What `ps` shows of the server: the file's name, not the token.
    std::ifstream cmdline("/proc/" + std::to_string(server.pid()) + "/cmdline");
    const std::string shown((std::istreambuf_iterator<char>(cmdline)), {});
    EXPECT_NE(shown.find(file), std::string::npos);
    EXPECT_EQ(shown.find("t0ken-in-a-file"), std::string::npos);

    // A missing or empty token file, or both a token and a file: exit 2 naming the flag.
    for (const auto& args :
         std::vector<std::vector<std::string>>{{"--unload-token-file", work.path() + "/none"},
                                               {"--token-file", work.path() + "/none"}}) {
        ServerProcess bad(args);
        EXPECT_EQ(bad.wait_exit() >> 8, 2) << bad.err();
        EXPECT_NE(bad.err().find("--unload-token-file " + work.path() + "/none"), std::string::npos)
            << bad.err();
    }
    write_file(work.path() + "/empty", "\n");
    ServerProcess empty({"--unload-token-file", work.path() + "/empty"});
    EXPECT_EQ(empty.wait_exit() >> 8, 2);
    EXPECT_NE(empty.err().find("first line is empty"), std::string::npos) << empty.err();
    ServerProcess both({"--unload-token", "x", "--unload-token-file", file});
    EXPECT_EQ(both.wait_exit() >> 8, 2);
    EXPECT_NE(both.err().find("--unload-token"), std::string::npos) << both.err();
}

TEST(TorchServerCommandLine, BadValuesNameTheFlagFromTheCommandLineOrTheEnvironment) {
    struct Case {
        std::vector<std::string> args;
        Env env;
        std::string wanted;
    };
    for (const Case& c :
         std::vector<Case>{{{"--port", "70000"}, {}, "--port"},
                           {{"--max-texts", "lots"}, {}, "--max-texts"},
                           {{"--no-such-flag", "1"}, {}, "--no-such-flag"},
                           {{"--dtype", "float64", "--model", "m.pt"}, {}, "--dtype"},
                           {{"--bos-id", "1"}, {}, "--bos-id"},  // needs --tokenizer
                           {{}, {{"VRAMGUARD_SERVER_MAX_TEXTS", "lots"}}, "--max-texts"},
                           {{},
                            {{"VRAMGUARD_SERVER_SIMULATE_OTHER_PROCESS_BYTES", "-1"}},
                            "--simulate-other-process-bytes"}}) {
        ServerProcess server(c.args, c.env);
        EXPECT_LT(server.port(), 0);
        const int status = server.wait_exit();
        ASSERT_TRUE(WIFEXITED(status)) << status;
        EXPECT_EQ(WEXITSTATUS(status), 2) << c.wanted << "\n" << server.err();
        const std::string err = server.err();
        EXPECT_NE(err.find(c.wanted), std::string::npos) << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    }
}

TEST(TorchServerCommandLine, HelpIsGeneratedAndNamesTheVariables) {
    const std::string command = std::string(VRAMGUARD_TORCH_SERVER_PATH) + " --help";
    FILE* pipe = ::popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    std::string help;
    char buffer[512];
    while (std::fgets(buffer, sizeof buffer, pipe)) help += buffer;
    EXPECT_EQ(::pclose(pipe), 0);
    for (const char* wanted :
         {"--model", "--tokenizer", "--unload-token-file", "VRAMGUARD_SERVER_UNLOAD_TOKEN",
          "VRAMGUARD_SERVER_PORT", "VRAMGUARD_SERVER_MODEL", "--simulate-shared-device"})
        EXPECT_NE(help.find(wanted), std::string::npos) << wanted << "\n" << help;
}

}  // namespace
