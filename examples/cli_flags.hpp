// SPDX-License-Identifier: MIT
// What examples/torch_server and examples/vram_manager share on their command lines (CLI11,
// Debian libcli11-dev): every flag also read from an environment variable named after it (so a
// token stays out of /proc/PID/cmdline and a container sets flags without a wrapper script), one
// line naming the flag on a bad value, and secrets read from files.
#pragma once

#include <CLI/CLI.hpp>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace example_cli {

// "--idle-unload-seconds" with prefix "VRAMGUARD_SERVER_" -> "VRAMGUARD_SERVER_IDLE_UNLOAD_SECONDS"
inline std::string env_name(const std::string& prefix, const std::string& long_name) {
    std::string name = prefix;
    for (const char c : long_name)
        name += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return name;
}

// Gives every option with a long name (--help aside) its environment variable. The command line
// wins over the environment; the generated --help shows each name ("Env:...").
inline void env_for_every_option(CLI::App& app, const std::string& prefix) {
    for (CLI::Option* option : app.get_options()) {
        if (option == app.get_help_ptr() || option->get_lnames().empty()) continue;
        option->envname(env_name(prefix, option->get_lnames().front()));
    }
}

// "a b  c" -> {"a", "b", "c"}: a repeatable flag's values in one environment variable.
inline std::vector<std::string> split_on_spaces(const std::string& text) {
    std::vector<std::string> words;
    std::istringstream in(text);
    for (std::string word; in >> word;) words.push_back(word);
    return words;
}

// For unsigned options: CLI11 converts with strtoull, which reads "-1" as 2^64 - 1.
inline CLI::Validator no_sign() {
    return CLI::Validator(
        [](std::string& value) {
            return value.find('-') == std::string::npos ? std::string()
                                                        : "wants a number >= 0, got " + value;
        },
        "", "UNSIGNED");
}

[[noreturn]] inline void usage_error(const std::string& program, const std::string& message) {
    std::fprintf(stderr, "%s: %s (%s --help lists the options)\n", program.c_str(), message.c_str(),
                 program.c_str());
    std::exit(2);
}

// Parses argv: --help prints the generated help and exits 0; any error (an unknown flag, a value
// that does not convert or is out of range, a missing value) exits 2 with one line naming the
// flag. Single-valued flags given twice keep the last value, as the hand-written parsers did.
inline void parse_or_exit(CLI::App& app, int argc, char** argv) {
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::fputs(app.help().c_str(), stdout);  // stdio: no std::cout in torch_server
        std::exit(0);
    } catch (const CLI::ParseError& e) {
        std::string message = e.what();
        while (!message.empty() && (message.back() == '\n' || message.back() == ' '))
            message.pop_back();
        usage_error(app.get_name(), message);
    }
}

// A secret kept in a file (--unload-token-file and the like): its first line, without the line
// end. A missing, unreadable or empty file is an error naming the flag.
inline std::string read_secret_file(const std::string& program, const std::string& flag,
                                    const std::string& path) {
    std::ifstream in(path);
    if (!in) usage_error(program, flag + " " + path + ": " + std::strerror(errno));
    std::string line;
    std::getline(in, line);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) usage_error(program, flag + " " + path + ": the file's first line is empty");
    return line;
}

}  // namespace example_cli
