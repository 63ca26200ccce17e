// checkpoint_dir.cpp -- checkpoint directory management: step file names, the `latest` pointer, pruning.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <system_error>

#include "checkpoints/checkpoint.h"
#include "parallel/check.h"

namespace bmoe::checkpoints {

namespace fs = std::filesystem;

namespace {

constexpr const char* kLatest = "latest";

std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
    return s;
}

std::string latest_name(const std::string& dir) {
    std::ifstream in(fs::path(dir) / kLatest);
    if (!in) return "";
    std::string name;
    std::getline(in, name);
    return trim(name);
}

}  // namespace

std::string checkpoint_path(const std::string& dir, int64_t step) {
    BMOE_REQUIRE(step >= 0, "checkpoint_path: step must be >= 0, got ", step);
    char name[40];
    std::snprintf(name, sizeof(name), "step_%08lld.h5", static_cast<long long>(step));
    return (fs::path(dir) / name).string();
}

void update_latest(const std::string& dir, const std::string& path) {
    const std::string name = fs::path(path).filename().string();
    BMOE_REQUIRE(fs::is_regular_file(fs::path(dir) / name), "update_latest: ", (fs::path(dir) / name).string(),
                 " does not exist; call it only after write_checkpoint succeeded");
    const fs::path tmp = fs::path(dir) / "latest.tmp";
    {
        std::ofstream out(tmp, std::ios::trunc);
        BMOE_REQUIRE(out.good(), "update_latest: cannot write ", tmp.string());
        out << name << "\n";
        out.flush();
        BMOE_REQUIRE(out.good(), "update_latest: write to ", tmp.string(), " failed");
    }
    int fd = ::open(tmp.c_str(), O_RDONLY);
    if (fd >= 0) {
        ::fsync(fd);
        ::close(fd);
    }
    std::error_code ec;
    fs::rename(tmp, fs::path(dir) / kLatest, ec);
    BMOE_REQUIRE(!ec, "update_latest: cannot rename ", tmp.string(), ": ", ec.message());
    fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        ::fsync(fd);
        ::close(fd);
    }
}

std::string latest_checkpoint(const std::string& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) return "";
    std::string name = latest_name(dir);
    if (name.empty()) return "";
    return (fs::path(dir) / name).string();
}

void prune_checkpoints(const std::string& dir, int keep) {
    BMOE_REQUIRE(keep >= 1, "prune_checkpoints: keep must be >= 1, got ", keep);
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) return;
    static const std::regex kStepFile(R"(step_(\d+)\.h5)");
    std::vector<std::pair<int64_t, fs::path>> files;
    for (const auto& entry : fs::directory_iterator(dir)) {
        std::smatch m;
        std::string name = entry.path().filename().string();
        if (entry.is_regular_file() && std::regex_match(name, m, kStepFile))
            files.emplace_back(std::stoll(m[1].str()), entry.path());
    }
    std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    const std::string protect = latest_name(dir);
    for (size_t i = static_cast<size_t>(keep); i < files.size(); ++i) {
        if (files[i].second.filename() == protect) continue;
        fs::remove(files[i].second, ec);
        BMOE_REQUIRE(!ec, "prune_checkpoints: cannot remove ", files[i].second.string(), ": ", ec.message());
    }
}

}  // namespace bmoe::checkpoints
