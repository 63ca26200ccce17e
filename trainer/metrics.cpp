#include "trainer/metrics.h"

#include <cstdio>
#include <nlohmann/json.hpp>

#include "parallel/check.h"

namespace bmoe::trainer {

MetricsLog::MetricsLog(const std::string& path, bool append) : path_(path) {
    if (path.empty()) return;
    out_.open(path, append ? std::ios::app : std::ios::trunc);
    BMOE_REQUIRE(out_.good(), "cannot write metrics file '", path, "': check that train.out_dir is writable");
}

void MetricsLog::write(const StepMetrics& m) {
    if (!out_.is_open()) return;
    nlohmann::json j = {{"step", m.step},
                        {"loss", m.loss},
                        {"ce", m.ce},
                        {"aux", m.aux},
                        {"z", m.z},
                        {"lr", m.lr},
                        {"grad_norm", m.grad_norm},
                        {"tokens_per_s", m.tokens_per_s},
                        {"elapsed_s", m.elapsed_s},
                        {"expert_load", m.expert_load},
                        {"dropped", m.num_dropped},
                        {"copies", m.num_copies},
                        {"step_s", m.step_s},
                        {"peak_memory_gib", m.peak_memory_gib},
                        {"exchange_s", m.exchange_s},
                        {"grad_sync_s", m.grad_sync_s},
                        {"exchange_bytes", m.exchange_bytes},
                        {"exchange_min_bytes", m.exchange_min_bytes}};
    if (!m.aux_layers.empty()) {
        j["aux_layers"] = m.aux_layers;
        j["z_layers"] = m.z_layers;
        j["reg_layers"] = m.reg_layers;
    }
    if (!m.router_sigma.empty() || !m.router_temperature.empty() || m.reg != 0.0) {
        j["reg"] = m.reg;
        j["beta"] = m.beta;
        if (!m.router_sigma.empty()) j["router_sigma"] = m.router_sigma;
        if (!m.router_temperature.empty()) j["router_temperature"] = m.router_temperature;
    }
    out_ << j.dump() << '\n';
    out_.flush();
}

void MetricsLog::write(const EvalMetrics& m) {
    if (!out_.is_open()) return;
    nlohmann::json j = {{"step", m.step}, {"val_loss", m.val_loss}, {"unigram_loss", m.unigram_loss}};
    out_ << j.dump() << '\n';
    out_.flush();
}

std::string format_duration(double s) {
    char buf[32];
    const long t = static_cast<long>(s + 0.5);
    if (t >= 3600)
        std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
    else if (t >= 60)
        std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
    else
        std::snprintf(buf, sizeof buf, "%lds", t);
    return buf;
}

std::string format_progress(const StepMetrics& m) {
    char buf[256];
    const double eta = m.step > 0 ? m.elapsed_s / m.step * (m.total_steps - m.step) : 0.0;
    std::snprintf(buf, sizeof buf,
                  "step %5d/%d | loss %.4f (ce %.4f aux %.3f z %.3f) | lr %.2e | gnorm %.2f | %.0f tok/s | ETA %s",
                  m.step, m.total_steps, m.loss, m.ce, m.aux, m.z, m.lr, m.grad_norm, m.tokens_per_s,
                  format_duration(eta).c_str());
    std::string line = buf;
    auto layer_mean = [](const std::vector<double>& v) {
        double s = 0.0;
        for (double x : v) s += x / static_cast<double>(v.size());
        return s;
    };
    if (m.reg != 0.0 || !m.router_sigma.empty() || !m.router_temperature.empty()) {
        std::snprintf(buf, sizeof buf, " | reg %.4g (beta %.1e)", m.reg, m.beta);
        line += buf;
    }
    if (!m.router_sigma.empty()) {
        std::snprintf(buf, sizeof buf, " sigma %.3f", layer_mean(m.router_sigma));
        line += buf;
    }
    if (!m.router_temperature.empty()) {
        std::snprintf(buf, sizeof buf, " T %.3f", layer_mean(m.router_temperature));
        line += buf;
    }
    // Per-expert load, summed over MoE layers, as % of routed copies; max/mean shows imbalance.
    if (!m.expert_load.empty()) {
        std::vector<int64_t> total(m.expert_load[0].size(), 0);
        int64_t sum = 0;
        for (const auto& layer : m.expert_load)
            for (size_t e = 0; e < layer.size(); ++e) total[e] += layer[e], sum += layer[e];
        int64_t mx = 0;
        line += " | load%";
        for (int64_t t : total) {
            line += concat(" ", sum > 0 ? (100 * t + sum / 2) / sum : 0);
            mx = std::max(mx, t);
        }
        std::snprintf(buf, sizeof buf, " (max/mean %.2f)",
                      sum > 0 ? static_cast<double>(mx) * static_cast<double>(total.size()) / sum : 0.0);
        line += buf;
    }
    if (m.num_dropped > 0) {
        std::snprintf(buf, sizeof buf, " | dropped %.2f%%", 100.0 * m.num_dropped / std::max<int64_t>(1, m.num_copies));
        line += buf;
    }
    if (m.exchange_s > 0.0 && m.step_s > 0.0) {
        std::snprintf(buf, sizeof buf, " | a2a %.0f%%", 100.0 * m.exchange_s / m.step_s);
        line += buf;
    }
    if (m.peak_memory_gib >= 1.0) {
        std::snprintf(buf, sizeof buf, " | mem %.1f GiB", m.peak_memory_gib);
        line += buf;
    } else if (m.peak_memory_gib > 0.0) {
        std::snprintf(buf, sizeof buf, " | mem %.0f MiB", m.peak_memory_gib * 1024.0);
        line += buf;
    }
    return line;
}

}  // namespace bmoe::trainer
