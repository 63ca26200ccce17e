#include "model/mlp.h"

#include "parallel/check.h"

namespace bmoe::model {

void GroupedMlp::set_recompute_activation(bool on) {
    recompute_activation_ = on;
    if (on) act_RF_ = Buffer<float>(), act16_RF_ = Buffer<uint16_t>(), x16_RD_ = Buffer<uint16_t>();  // not kept
}

bool GroupedMlp::keeps_input() const {
    return bf16_storage_ && !recompute_activation_ && backend_->matmul_precision() == MatmulPrecision::kBf16;
}

uint16_t* GroupedMlp::input16_rows(int R) {
    BMOE_ASSERT(keeps_input(), "input16_rows: the MLP keeps no bf16 input copy in this mode");
    x16_RD_.ensure(backend_, static_cast<size_t>(R) * D_);
    return x16_RD_.data();
}

const uint16_t* GroupedMlp::round_input(const float* x_RD, size_t RD) {
    Buffer<uint16_t>& x16 = recompute_activation_ ? scratch_->mlp_x16_RD : x16_RD_;
    x16.ensure(backend_, RD);
    backend_->float_to_bf16(x16.data(), x_RD, RD);
    return x16.data();
}

void GroupedMlp::activation_forward(float* act_RF, size_t RF) {
    if (activation_ == Activation::kSwiGlu) {
        backend_->swiglu_forward(act_RF, h_gate_RF_.data(), h_up_RF_.data(), RF);
    } else {
        backend_->gelu_forward(act_RF, h_up_RF_.data(), RF);
    }
}

void GroupedMlp::activation_forward16(uint16_t* act16_RF, size_t RF) {
    if (activation_ == Activation::kSwiGlu) {
        backend_->swiglu_forward_bf16(act16_RF, h_gate16_RF_.data(), h_up16_RF_.data(), RF);
    } else {
        backend_->gelu_forward_bf16(act16_RF, h_up16_RF_.data(), RF);
    }
}

float* GroupedMlp::activation_buffer(size_t RF) {
    Buffer<float>& act = recompute_activation_ ? scratch_->mlp_act_RF : act_RF_;
    act.ensure(backend_, RF);
    return act.data();
}

uint16_t* GroupedMlp::activation_buffer16(size_t RF) {
    Buffer<uint16_t>& act = recompute_activation_ ? scratch_->mlp_act16_RF : act16_RF_;
    act.ensure(backend_, RF);
    return act.data();
}

void GroupedMlp::forward(float* y_RD, const float* x_RD, const MlpWeights& w, const std::vector<int>& offsets_host) {
    offsets_ = offsets_host;
    const int G = static_cast<int>(offsets_.size()) - 1, R = offsets_.back();
    const size_t RF = static_cast<size_t>(R) * F_;
    const bool swiglu = activation_ == Activation::kSwiGlu;
    stored16_ = bf16_storage_ && backend_->matmul_precision() == MatmulPrecision::kBf16;
    if (R == 0) return;  // no rows (an expert-parallel rank whose experts got none): nothing to write
    if (stored16_) {  // every [R, F] tensor bf16; the fp32 ones of an earlier mode go
        h_up_RF_ = Buffer<float>(), h_gate_RF_ = Buffer<float>();
        if (!recompute_activation_) act_RF_ = Buffer<float>();
        // x rounded once for both products and backward's dW (the GEMMs would round it the same),
        // or already rounded by the caller
        BMOE_ASSERT(x_RD != nullptr || (keeps_input() && x16_RD_.size() >= static_cast<size_t>(R) * D_),
                    "GroupedMlp::forward without x_RD needs the rows in input16_rows(R)");
        const uint16_t* x16 = x_RD ? round_input(x_RD, static_cast<size_t>(R) * D_) : x16_RD_.data();
        h_up16_RF_.ensure(backend_, RF);
        backend_->grouped_matmul_forward_bf16(nullptr, h_up16_RF_.data(), nullptr, x16, w.up, offsets_.data(), G, D_,
                                              F_);
        if (swiglu) {
            h_gate16_RF_.ensure(backend_, RF);
            backend_->grouped_matmul_forward_bf16(nullptr, h_gate16_RF_.data(), nullptr, x16, w.gate, offsets_.data(),
                                                  G, D_, F_);
        }
        uint16_t* act16 = activation_buffer16(RF);
        activation_forward16(act16, RF);
        backend_->grouped_matmul_forward_bf16(y_RD, nullptr, nullptr, act16, w.down, offsets_.data(), G, F_, D_);
        return;
    }
    h_up16_RF_ = Buffer<uint16_t>(), h_gate16_RF_ = Buffer<uint16_t>(), x16_RD_ = Buffer<uint16_t>();
    if (!recompute_activation_) act16_RF_ = Buffer<uint16_t>();
    h_up_RF_.ensure(backend_, RF);
    backend_->grouped_matmul_forward(h_up_RF_.data(), x_RD, w.up, offsets_.data(), G, D_, F_);
    if (swiglu) {
        h_gate_RF_.ensure(backend_, RF);
        backend_->grouped_matmul_forward(h_gate_RF_.data(), x_RD, w.gate, offsets_.data(), G, D_, F_);
    }
    float* act = activation_buffer(RF);
    activation_forward(act, RF);
    backend_->grouped_matmul_forward(y_RD, act, w.down, offsets_.data(), G, F_, D_);
}

void GroupedMlp::backward(float* dx_RD,
                          const MlpGrads& dw,
                          const float* dy_RD,
                          const uint16_t* dy16_RD,
                          const float* x_RD,
                          const MlpWeights& w) {
    BMOE_ASSERT((dy_RD != nullptr) != (dy16_RD != nullptr) || offsets_.back() == 0,
                "GroupedMlp::backward takes one of dy_RD and dy16_RD");
    BMOE_ASSERT(dy16_RD == nullptr || stored16_, "GroupedMlp::backward: bf16 d rows need the bf16 tensors");
    const int G = static_cast<int>(offsets_.size()) - 1, R = offsets_.back();
    const size_t RF = static_cast<size_t>(R) * F_;
    if (R == 0) return;  // no rows: dx has none, the weight gradients get += 0
    if (stored16_) {  // every [R, F] tensor bf16: d act, d h_up, d h_gate
        uint16_t* act16 = recompute_activation_ ? activation_buffer16(RF) : act16_RF_.data();
        if (recompute_activation_) activation_forward16(act16, RF);
        const uint16_t* x16 = recompute_activation_ ? round_input(x_RD, static_cast<size_t>(R) * D_) : x16_RD_.data();
        Buffer<uint16_t>& dact16 = scratch_->mlp_dact16_RF;
        Buffer<uint16_t>& dh_up = scratch_->mlp_dh_up16_RF;
        dact16.ensure(backend_, RF);
        dh_up.ensure(backend_, RF);
        backend_->grouped_matmul_backward_bf16(nullptr, dact16.data(), dw.down, dy_RD, dy16_RD, nullptr, act16, w.down,
                                               offsets_.data(), G, F_, D_);
        if (activation_ == Activation::kSwiGlu) {
            Buffer<uint16_t>& dh_gate = scratch_->mlp_dh_gate16_RF;
            Buffer<float>& dx_up = scratch_->mlp_dx_RD;
            dh_gate.ensure(backend_, RF);
            dx_up.ensure(backend_, static_cast<size_t>(R) * D_);
            backend_->swiglu_backward_bf16(dh_gate.data(), dh_up.data(), dact16.data(), h_gate16_RF_.data(),
                                           h_up16_RF_.data(), RF);
            backend_->grouped_matmul_backward_bf16(dx_RD, nullptr, dw.gate, nullptr, dh_gate.data(), nullptr, x16,
                                                   w.gate, offsets_.data(), G, D_, F_);
            backend_->grouped_matmul_backward_bf16(dx_up.data(), nullptr, dw.up, nullptr, dh_up.data(), nullptr, x16,
                                                   w.up, offsets_.data(), G, D_, F_);
            backend_->accumulate(dx_RD, dx_up.data(), static_cast<size_t>(R) * D_);
        } else {
            backend_->gelu_backward_bf16(dh_up.data(), dact16.data(), h_up16_RF_.data(), RF);
            backend_->grouped_matmul_backward_bf16(dx_RD, nullptr, dw.up, nullptr, dh_up.data(), nullptr, x16, w.up,
                                                   offsets_.data(), G, D_, F_);
        }
        return;
    }
    Buffer<float>& dact = scratch_->mlp_dact_RF;
    Buffer<float>& dh_up = scratch_->mlp_dh_up_RF;
    dact.ensure(backend_, RF);
    dh_up.ensure(backend_, RF);
    float* act = recompute_activation_ ? activation_buffer(RF) : act_RF_.data();
    if (recompute_activation_) activation_forward(act, RF);
    backend_->grouped_matmul_backward(dact.data(), dw.down, dy_RD, act, w.down, offsets_.data(), G, F_, D_);
    if (activation_ == Activation::kSwiGlu) {
        Buffer<float>& dh_gate = scratch_->mlp_dh_gate_RF;
        Buffer<float>& dx_up = scratch_->mlp_dx_RD;
        dh_gate.ensure(backend_, RF);
        dx_up.ensure(backend_, static_cast<size_t>(R) * D_);
        backend_->swiglu_backward(dh_gate.data(), dh_up.data(), dact.data(), h_gate_RF_.data(), h_up_RF_.data(), RF);
        backend_->grouped_matmul_backward(dx_RD, dw.gate, dh_gate.data(), x_RD, w.gate, offsets_.data(), G, D_, F_);
        backend_->grouped_matmul_backward(dx_up.data(), dw.up, dh_up.data(), x_RD, w.up, offsets_.data(), G, D_, F_);
        backend_->accumulate(dx_RD, dx_up.data(), static_cast<size_t>(R) * D_);
    } else {
        backend_->gelu_backward(dh_up.data(), dact.data(), h_up_RF_.data(), RF);
        backend_->grouped_matmul_backward(dx_RD, dw.up, dh_up.data(), x_RD, w.up, offsets_.data(), G, D_, F_);
    }
}

}  // namespace bmoe::model
