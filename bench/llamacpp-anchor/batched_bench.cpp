// anchor-batched-bench: llama.cpp's own batched throughput on a GGUF, the baseline of
// `cargo xtask bench sample` and `bench eval`. It follows the method of llama.cpp's batched-bench
// tool through the public llama.h API only (the llama-cpp-sys-2 crate vendors llama.h and the
// library, not the tool):
//
//   for every (pp, tg, pl): clear the KV cache, then
//     prompt phase  : decode pl prompts of pp tokens (in chunks of n_batch), one output per prompt;
//                     with -pps the prompt is shared: decode it once on sequence 0 and copy its KV
//                     cache to sequences 1..pl-1;
//     generation    : tg steps, each decoding one token for every one of the pl sequences, with
//                     one output (a row of logits) per sequence.
//
// The tokens are fixed pseudo-random ids and nothing is sampled: speed_tg (pl*tg / t_tg) is the
// decode throughput with logits computed but EXCLUDES SAMPLING. The KV cache is split per
// sequence (kv_unified = false, swa_full = true, as em-llama configures its contexts); with -pps
// llama.cpp performs the cross-sequence copy at the next decode, so it lands in t_tg.
//
// Usage: anchor-batched-bench -m MODEL [-t THREADS] [-npp PP[,PP..]] [-ntg TG[,TG..]]
//                             [-npl B[,B..]] [-r REPS] [-pps] [-b N_BATCH] [-ub N_UBATCH]
//
// Output: one JSON line on stdout per (pp, tg, pl), the medians over REPS repetitions, with the
// figures batched-bench prints: pp, tg, pl, n_kv, t_pp, speed_pp, t_tg, speed_tg, t, speed
// (seconds and tokens per second), and the settings they were measured with. Diagnostics go to
// stderr.

#include "llama.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Options {
    std::string model;
    int threads = 1;
    std::vector<int> npp = {128};
    std::vector<int> ntg = {128};
    std::vector<int> npl = {1};
    int reps = 1;
    bool pps = false;
    int n_batch = 2048;
    int n_ubatch = 512;
};

void usage(const char * argv0) {
    std::fprintf(stderr,
                 "usage: %s -m MODEL [-t THREADS] [-npp PP[,PP..]] [-ntg TG[,TG..]] [-npl B[,B..]]\n"
                 "       [-r REPS] [-pps] [-b N_BATCH] [-ub N_UBATCH]\n",
                 argv0);
}

// "8,16,32" -> {8, 16, 32}; false on anything but positive integers.
bool parse_list(const char * text, std::vector<int> & out) {
    out.clear();
    std::string s(text);
    size_t start = 0;
    while (start <= s.size()) {
        size_t end = s.find(',', start);
        if (end == std::string::npos) {
            end = s.size();
        }
        std::string item = s.substr(start, end - start);
        char * rest = nullptr;
        long v = std::strtol(item.c_str(), &rest, 10);
        if (item.empty() || *rest != '\0' || v <= 0 || v > 1 << 20) {
            return false;
        }
        out.push_back((int) v);
        start = end + 1;
    }
    return !out.empty();
}

bool parse_int(const char * text, int & out) {
    std::vector<int> one;
    if (!parse_list(text, one) || one.size() != 1) {
        return false;
    }
    out = one[0];
    return true;
}

bool parse_args(int argc, char ** argv, Options & o) {
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-pps") {
            o.pps = true;
            continue;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "%s needs a value\n", a.c_str());
            return false;
        }
        const char * v = argv[++i];
        bool ok = true;
        if (a == "-m") {
            o.model = v;
        } else if (a == "-t") {
            ok = parse_int(v, o.threads);
        } else if (a == "-npp") {
            ok = parse_list(v, o.npp);
        } else if (a == "-ntg") {
            ok = parse_list(v, o.ntg);
        } else if (a == "-npl") {
            ok = parse_list(v, o.npl);
        } else if (a == "-r") {
            ok = parse_int(v, o.reps);
        } else if (a == "-b") {
            ok = parse_int(v, o.n_batch);
        } else if (a == "-ub") {
            ok = parse_int(v, o.n_ubatch);
        } else {
            std::fprintf(stderr, "unknown argument %s\n", a.c_str());
            return false;
        }
        if (!ok) {
            std::fprintf(stderr, "%s: bad value '%s'\n", a.c_str(), v);
            return false;
        }
    }
    if (o.model.empty()) {
        std::fprintf(stderr, "-m MODEL is required\n");
        return false;
    }
    return true;
}

// llama.cpp's log, errors only (a continuation line follows the level of the line it continues).
void quiet_log(ggml_log_level level, const char * text, void *) {
    static ggml_log_level last = GGML_LOG_LEVEL_NONE;
    if (level != GGML_LOG_LEVEL_CONT) {
        last = level;
    }
    if (last == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

// Deterministic token ids in [0, n_vocab): the values do not change the work done.
struct Tokens {
    uint64_t state = 0x9e3779b97f4a7c15ull;
    int32_t n_vocab;
    explicit Tokens(int32_t n) : n_vocab(n) {}
    llama_token next() {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        return (llama_token) ((state >> 33) % (uint64_t) n_vocab);
    }
};

void batch_add(llama_batch & b, llama_token token, llama_pos pos, llama_seq_id seq, bool output) {
    const int i = b.n_tokens++;
    b.token[i] = token;
    b.pos[i] = pos;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = seq;
    b.logits[i] = output ? 1 : 0;
}

// Decodes `b` in slices of at most n_batch tokens, then waits for the backend.
bool decode(llama_context * ctx, const llama_batch & b, int n_batch) {
    for (int i = 0; i < b.n_tokens; i += n_batch) {
        const int n = std::min(n_batch, b.n_tokens - i);
        llama_batch view = {n, b.token + i, nullptr, b.pos + i, b.n_seq_id + i, b.seq_id + i, b.logits + i};
        const int32_t rc = llama_decode(ctx, view);
        if (rc != 0) {
            std::fprintf(stderr, "llama_decode failed (%d)\n", rc);
            return false;
        }
    }
    llama_synchronize(ctx);
    return true;
}

double median(std::vector<double> xs) {
    std::sort(xs.begin(), xs.end());
    return xs[xs.size() / 2];
}

double seconds_since(int64_t t0_us) {
    return (double) (llama_time_us() - t0_us) / 1e6;
}

// One (pp, tg, pl) setting: a fresh context, a warm-up, REPS timed runs; prints the JSON line.
bool run_setting(llama_model * model, const Options & o, int pp, int tg, int pl) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    Tokens tokens(llama_vocab_n_tokens(vocab));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (pl * (pp + tg));  // split per sequence: pp + tg cells each
    cp.n_batch = (uint32_t) std::max(o.n_batch, pl);
    cp.n_ubatch = (uint32_t) std::min(o.n_ubatch, o.n_batch);
    cp.n_seq_max = (uint32_t) pl;
    cp.n_threads = o.threads;
    cp.n_threads_batch = o.threads;
    cp.kv_unified = false;
    cp.swa_full = true;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        std::fprintf(stderr, "cannot create a context of %d cells for %d sequences\n", pl * (pp + tg), pl);
        return false;
    }
    if ((int) llama_n_ctx_seq(ctx) < pp + tg) {
        std::fprintf(stderr, "context holds %u cells per sequence, need %d\n", llama_n_ctx_seq(ctx), pp + tg);
        llama_free(ctx);
        return false;
    }
    const int n_batch = (int) llama_n_batch(ctx);  // llama.cpp caps it at n_ctx
    llama_memory_t mem = llama_get_memory(ctx);
    llama_batch batch = llama_batch_init(std::max(pl * pp, pl), 0, 1);
    bool ok = true;

    // Warm-up (untimed): a short prompt on every sequence and one generation step.
    batch.n_tokens = 0;
    for (int s = 0; s < pl; ++s) {
        for (int p = 0; p < std::min(pp, 16); ++p) {
            batch_add(batch, tokens.next(), p, s, p == std::min(pp, 16) - 1);
        }
    }
    ok = decode(ctx, batch, n_batch);
    batch.n_tokens = 0;
    for (int s = 0; s < pl && ok; ++s) {
        batch_add(batch, tokens.next(), std::min(pp, 16), s, true);
    }
    ok = ok && decode(ctx, batch, n_batch);

    std::vector<double> t_pps, t_tgs;
    for (int rep = 0; rep < o.reps && ok; ++rep) {
        llama_memory_clear(mem, true);

        const int64_t t0 = llama_time_us();
        batch.n_tokens = 0;
        const int prompts = o.pps ? 1 : pl;
        for (int s = 0; s < prompts; ++s) {
            for (int p = 0; p < pp; ++p) {
                batch_add(batch, tokens.next(), p, s, p == pp - 1);
            }
        }
        ok = decode(ctx, batch, n_batch);
        if (o.pps) {
            for (int s = 1; s < pl; ++s) {
                llama_memory_seq_cp(mem, 0, s, -1, -1);
            }
        }
        t_pps.push_back(seconds_since(t0));

        const int64_t t1 = llama_time_us();
        for (int i = 0; i < tg && ok; ++i) {
            batch.n_tokens = 0;
            for (int s = 0; s < pl; ++s) {
                batch_add(batch, tokens.next(), pp + i, s, true);
            }
            ok = decode(ctx, batch, n_batch);
        }
        t_tgs.push_back(seconds_since(t1));
    }

    if (ok) {
        const double t_pp = median(t_pps);
        const double t_tg = median(t_tgs);
        const double t = t_pp + t_tg;
        const int pp_tokens = o.pps ? pp : pl * pp;
        const int n_kv = o.pps ? pp + pl * tg : pl * (pp + tg);
        std::printf(
            "{\"n_kv_max\": %u, \"n_batch\": %u, \"n_ubatch\": %u, \"is_pp_shared\": %d, \"n_threads\": %d, "
            "\"n_threads_batch\": %d, \"reps\": %d, \"pp\": %d, \"tg\": %d, \"pl\": %d, \"n_kv\": %d, "
            "\"t_pp\": %.6f, \"speed_pp\": %.6f, \"t_tg\": %.6f, \"speed_tg\": %.6f, \"t\": %.6f, \"speed\": %.6f}\n",
            llama_n_ctx(ctx), llama_n_batch(ctx), llama_n_ubatch(ctx), o.pps ? 1 : 0, o.threads, o.threads, o.reps,
            pp, tg, pl, n_kv, t_pp, pp_tokens / t_pp, t_tg, (double) pl * tg / t_tg, t,
            (pp_tokens + (double) pl * tg) / t);
        std::fflush(stdout);
    }

    llama_batch_free(batch);
    llama_free(ctx);
    return ok;
}

}  // namespace

int main(int argc, char ** argv) {
    Options o;
    if (!parse_args(argc, argv, o)) {
        usage(argv[0]);
        return 2;
    }
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(o.model.c_str(), mp);
    if (model == nullptr) {
        std::fprintf(stderr, "%s: cannot load the model\n", o.model.c_str());
        llama_backend_free();
        return 1;
    }
    std::fprintf(stderr, "anchor-batched-bench: %s, %d threads, %s prompt, %d reps; %s\n", o.model.c_str(),
                 o.threads, o.pps ? "shared" : "separate", o.reps, llama_print_system_info());

    int rc = 0;
    for (int pp : o.npp) {
        for (int tg : o.ntg) {
            for (int pl : o.npl) {
                if (!run_setting(model, o, pp, tg, pl)) {
                    rc = 1;
                }
            }
        }
    }
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
