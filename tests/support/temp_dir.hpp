// SPDX-License-Identifier: MIT
// A fresh directory for one test, removed with everything in it when the test ends (POSIX).
#pragma once

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vramguard_test {

class TempDir {
   public:
    // Created under $TMPDIR (else /tmp) as "<prefix>XXXXXX".
    explicit TempDir(const std::string& prefix = "vramguard-test-") {
        const char* base = std::getenv("TMPDIR");
        std::string pattern = (base && *base) ? base : "/tmp";
        pattern += "/" + prefix + "XXXXXX";
        std::vector<char> buffer(pattern.begin(), pattern.end());
        buffer.push_back('\0');
        if (::mkdtemp(buffer.data()) == nullptr)
            throw std::runtime_error("mkdtemp(" + pattern + "): " + std::strerror(errno));
        path_ = buffer.data();
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() { remove_tree(path_); }

    const std::string& path() const noexcept { return path_; }
    // "<dir>/<name>"; nothing is created.
    std::string file(const std::string& name) const { return path_ + "/" + name; }

    // Writes `contents` to "<dir>/<name>" and returns its path.
    std::string write(const std::string& name, const std::string& contents) const {
        const std::string target = file(name);
        std::ofstream out(target, std::ios::binary | std::ios::trunc);
        out << contents;
        if (!out) throw std::runtime_error("cannot write " + target);
        return target;
    }

    // Removes `root` and everything below it, even directories a test made read-only.
    static void remove_tree(const std::string& root) {
        // Pre-order first so that every directory is writable before its entries are unlinked.
        ::nftw(
            root.c_str(),
            [](const char* path, const struct stat* st, int type, struct FTW*) {
                if (type == FTW_D || type == FTW_DNR) ::chmod(path, (st->st_mode & 07777) | 0700);
                return 0;
            },
            16, FTW_PHYS);
        ::nftw(
            root.c_str(),
            [](const char* path, const struct stat*, int type, struct FTW*) {
                if (type == FTW_DP || type == FTW_D || type == FTW_DNR)
                    ::rmdir(path);
                else
                    ::unlink(path);
                return 0;
            },
            16, FTW_DEPTH | FTW_PHYS);
    }

   private:
    std::string path_;
};

}  // namespace vramguard_test
