// SPDX-License-Identifier: MIT
// SentencePiece for torch_server_model_test, in a process without LibTorch (the two cannot share
// one: examples/torch_server/sentencepiece/sentencepiece_shim.h says why).
//   sentencepiece_tool train ARGS          SentencePieceTrainer::Train(ARGS)
//   sentencepiece_tool encode MODEL        one line of ids (space-separated) per line of stdin
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    if (argc == 3 && std::strcmp(argv[1], "train") == 0) {
        const auto status = sentencepiece::SentencePieceTrainer::Train(argv[2]);
        if (status.ok()) return 0;
        std::fprintf(stderr, "sentencepiece_tool: %s\n", status.ToString().c_str());
        return 1;
    }
    if (argc == 3 && std::strcmp(argv[1], "encode") == 0) {
        sentencepiece::SentencePieceProcessor processor;
        const auto status = processor.Load(argv[2]);
        if (!status.ok()) {
            std::fprintf(stderr, "sentencepiece_tool: %s\n", status.ToString().c_str());
            return 1;
        }
        for (std::string line; std::getline(std::cin, line);) {
            std::vector<int> ids;
            if (!processor.Encode(line, &ids).ok()) return 1;
            for (std::size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %d" : "%d", ids[i]);
            std::printf("\n");
        }
        return 0;
    }
    std::fprintf(stderr, "usage: sentencepiece_tool train ARGS | encode MODEL < lines\n");
    return 2;
}
