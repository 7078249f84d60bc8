// A replicated key-value store in C: the same commands, replies and snapshot bytes as the Rust
// `kv` guest (examples/guests/kv), so either can replace the other with `waft deploy`
// (a hot-swap carries the state over in the shared snapshot format).
//
// Commands: put KEY VALUE | get KEY | del KEY | cas KEY EXPECTED NEW | scan PREFIX
// Queries:  get KEY | scan [PREFIX]
//
// Build: see README.md beside this file (clang with wasi-libc, `wit-bindgen c`, and
// `wasm-tools component new` with the preview1 reactor adapter). waft's test build does the
// same steps (tests/build.rs).
//
// Determinism: the state is an array kept sorted by key bytes (the order of the Rust guest's
// BTreeMap<String, String>), so scans and snapshots are canonical. Nothing reads a clock or
// randomness. Whitespace is ASCII whitespace; the Rust guest also trims Unicode spaces, so a
// command padded with, say, U+00A0 gets a different answer from the two guests (each replica
// runs the same guest, so replicas still agree).

#include "guest.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- Byte strings -------------------------------------------------------------------------

// A view of bytes owned by someone else.
typedef struct {
    const uint8_t *ptr;
    size_t len;
} view_t;

// Bytes this guest owns (malloc).
typedef struct {
    uint8_t *ptr;
    size_t len;
} bytes_t;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) abort();  // a trap: the host discards the call's effects
    return p;
}

static bytes_t copy_of(view_t v) {
    bytes_t b = {xmalloc(v.len), v.len};
    memcpy(b.ptr, v.ptr, v.len);
    return b;
}

static bool is_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static view_t trim_start(view_t v) {
    while (v.len && is_space(v.ptr[0])) v.ptr++, v.len--;
    return v;
}

static view_t trim(view_t v) {
    v = trim_start(v);
    while (v.len && is_space(v.ptr[v.len - 1])) v.len--;
    return v;
}

static bool equals(view_t v, const char *s) {
    size_t n = strlen(s);
    return v.len == n && memcmp(v.ptr, s, n) == 0;
}

// Byte order, shorter first on a common prefix: Rust's str and [u8] order.
static int compare(view_t a, view_t b) {
    size_t n = a.len < b.len ? a.len : b.len;
    int c = n ? memcmp(a.ptr, b.ptr, n) : 0;
    if (c) return c;
    return a.len < b.len ? -1 : a.len > b.len;
}

// Splits off the first space-separated word (after leading whitespace).
static void word(view_t text, view_t *head, view_t *rest) {
    text = trim_start(text);
    const uint8_t *space = text.len ? memchr(text.ptr, ' ', text.len) : NULL;
    if (!space) {
        *head = text;
        *rest = (view_t){text.ptr + text.len, 0};
        return;
    }
    *head = (view_t){text.ptr, (size_t)(space - text.ptr)};
    *rest = (view_t){space + 1, text.len - head->len - 1};
}

// Whether v is valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
static bool utf8(view_t v) {
    size_t i = 0;
    while (i < v.len) {
        uint8_t c = v.ptr[i];
        size_t n;
        uint32_t min, cp;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xE0) == 0xC0) { n = 1; min = 0x80; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { n = 2; min = 0x800; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { n = 3; min = 0x10000; cp = c & 0x07; }
        else return false;
        if (v.len - i <= n) return false;
        for (size_t k = 1; k <= n; k++) {
            uint8_t d = v.ptr[i + k];
            if ((d & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += n + 1;
    }
    return true;
}

// A growable output buffer.
typedef struct {
    uint8_t *ptr;
    size_t len, cap;
} buf_t;

static void put(buf_t *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->ptr, cap);
        if (!p) abort();
        b->ptr = p;
        b->cap = cap;
    }
    if (n) memcpy(b->ptr + b->len, data, n);
    b->len += n;
}

static void put_view(buf_t *b, view_t v) { put(b, v.ptr, v.len); }
static void put_str(buf_t *b, const char *s) { put(b, s, strlen(s)); }

static void put_u32(buf_t *b, uint32_t x) {
    uint8_t le[4] = {x, x >> 8, x >> 16, x >> 24};
    put(b, le, 4);
}

static void put_u64(buf_t *b, uint64_t x) {
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)(x >> (8 * i));
    put(b, le, 8);
}

// Quotes text the way Rust's `{:?}` does for the ASCII range, so errors match the Rust kv.
static void put_debug(buf_t *b, view_t v) {
    put_str(b, "\"");
    for (size_t i = 0; i < v.len; i++) {
        uint8_t c = v.ptr[i];
        char esc[16];
        switch (c) {
            case '\\': put_str(b, "\\\\"); break;
            case '"': put_str(b, "\\\""); break;
            case '\n': put_str(b, "\\n"); break;
            case '\r': put_str(b, "\\r"); break;
            case '\t': put_str(b, "\\t"); break;
            case '\0': put_str(b, "\\0"); break;
            default:
                if (c < 0x20 || c == 0x7F) {
                    snprintf(esc, sizeof esc, "\\u{%x}", c);
                    put_str(b, esc);
                } else {
                    put(b, &c, 1);
                }
        }
    }
    put_str(b, "\"");
}

// ---- The store ----------------------------------------------------------------------------

typedef struct {
    bytes_t key, value;
} pair_t;

typedef struct {
    pair_t *pairs;  // sorted by key, no duplicates
    size_t len, cap;
} kv_t;

static kv_t STATE;

static view_t view(bytes_t b) { return (view_t){b.ptr, b.len}; }

// The position of key, or where it would go; *found says which.
static size_t find(const kv_t *kv, view_t key, bool *found) {
    size_t lo = 0, hi = kv->len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = compare(view(kv->pairs[mid].key), key);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    *found = false;
    return lo;
}

static void set(kv_t *kv, view_t key, view_t value) {
    bool found;
    size_t at = find(kv, key, &found);
    if (found) {
        free(kv->pairs[at].value.ptr);
        kv->pairs[at].value = copy_of(value);
        return;
    }
    if (kv->len == kv->cap) {
        size_t cap = kv->cap ? kv->cap * 2 : 16;
        pair_t *p = realloc(kv->pairs, cap * sizeof *p);
        if (!p) abort();
        kv->pairs = p;
        kv->cap = cap;
    }
    memmove(&kv->pairs[at + 1], &kv->pairs[at], (kv->len - at) * sizeof *kv->pairs);
    kv->pairs[at] = (pair_t){copy_of(key), copy_of(value)};
    kv->len++;
}

static void clear(kv_t *kv) {
    for (size_t i = 0; i < kv->len; i++) {
        free(kv->pairs[i].key.ptr);
        free(kv->pairs[i].value.ptr);
    }
    free(kv->pairs);
    *kv = (kv_t){0};
}

// ---- Commands -----------------------------------------------------------------------------

// An answer: ok with reply bytes, or an error message.
typedef struct {
    bool ok;
    buf_t out;
} answer_t;

static answer_t ok_str(const char *s) {
    answer_t a = {true, {0}};
    put_str(&a.out, s);
    return a;
}

static answer_t fail(const char *fmt, ...) {
    answer_t a = {false, {0}};
    char small[256];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(small, sizeof small, fmt, args);
    va_end(args);
    if (n < 0) abort();
    if ((size_t)n < sizeof small) {
        put(&a.out, small, (size_t)n);
    } else {
        char *big = xmalloc((size_t)n + 1);
        va_start(args, fmt);
        vsnprintf(big, (size_t)n + 1, fmt, args);
        va_end(args);
        put(&a.out, big, (size_t)n);
        free(big);
    }
    return a;
}

// `%.*s` arguments for a view.
#define VIEW(v) (int)(v).len, (const char *)(v).ptr

static answer_t missing(const char *what, const char *usage) {
    return fail("missing %s; usage: %s", what, usage);
}

// "unknown WHAT \"VERB\"; EXPECTED", quoting the verb as the Rust guest does.
static answer_t unknown(const char *what, view_t verb, const char *expected) {
    answer_t a = {false, {0}};
    put_str(&a.out, "unknown ");
    put_str(&a.out, what);
    put_str(&a.out, " ");
    put_debug(&a.out, verb);
    put_str(&a.out, "; ");
    put_str(&a.out, expected);
    return a;
}

static answer_t get(view_t key) {
    key = trim(key);
    if (!key.len) return missing("KEY", "get KEY");
    bool found;
    size_t at = find(&STATE, key, &found);
    if (!found) return fail("key not found: %.*s", VIEW(key));
    answer_t a = {true, {0}};
    put_view(&a.out, view(STATE.pairs[at].value));
    return a;
}

static answer_t scan(view_t prefix) {
    prefix = trim(prefix);
    answer_t a = {true, {0}};
    bool found;
    for (size_t i = find(&STATE, prefix, &found); i < STATE.len; i++) {
        pair_t *p = &STATE.pairs[i];
        if (p->key.len < prefix.len || memcmp(p->key.ptr, prefix.ptr, prefix.len) != 0) break;
        put_view(&a.out, view(p->key));
        put_str(&a.out, " ");
        put_view(&a.out, view(p->value));
        put_str(&a.out, "\n");
    }
    return a;
}

static answer_t apply(view_t command) {
    if (!utf8(command)) return fail("command is not UTF-8");
    view_t verb, rest;
    word(command, &verb, &rest);
    if (equals(verb, "put")) {
        view_t key, value;
        word(rest, &key, &value);
        if (!key.len) return missing("KEY", "put KEY VALUE");
        set(&STATE, key, value);
        return ok_str("OK");
    }
    if (equals(verb, "get")) return get(rest);
    if (equals(verb, "del")) {
        view_t key = trim(rest);
        if (!key.len) return missing("KEY", "del KEY");
        bool found;
        size_t at = find(&STATE, key, &found);
        if (!found) return fail("key not found: %.*s", VIEW(key));
        free(STATE.pairs[at].key.ptr);
        free(STATE.pairs[at].value.ptr);
        memmove(&STATE.pairs[at], &STATE.pairs[at + 1], (STATE.len - at - 1) * sizeof *STATE.pairs);
        STATE.len--;
        return ok_str("OK");
    }
    if (equals(verb, "cas")) {
        const char *usage = "cas KEY EXPECTED NEW";
        view_t key, expected, new_value;
        word(rest, &key, &rest);
        word(rest, &expected, &new_value);
        if (!key.len) return missing("KEY", usage);
        if (!expected.len) return missing("EXPECTED", usage);
        bool found;
        size_t at = find(&STATE, key, &found);
        if (!found) return fail("key not found: %.*s", VIEW(key));
        bytes_t *current = &STATE.pairs[at].value;
        if (compare(view(*current), expected) != 0)
            return fail("compare failed: %.*s is %.*s", VIEW(key), VIEW(view(*current)));
        free(current->ptr);
        *current = copy_of(new_value);
        return ok_str("OK");
    }
    if (equals(verb, "scan")) return scan(rest);
    if (!verb.len) return fail("empty command; try: put KEY VALUE");
    return unknown("command", verb, "expected put, get, del, cas or scan");
}

static answer_t query(view_t request) {
    if (!utf8(request)) return fail("query is not UTF-8");
    view_t verb, rest;
    word(request, &verb, &rest);
    if (equals(verb, "get")) return get(rest);
    if (equals(verb, "scan")) return scan(rest);
    return unknown("query", verb, "queries are get KEY and scan [PREFIX]");
}

// ---- Snapshots: "WKV1", u64 count, then (u32 len, key, u32 len, value) in key order --------

static buf_t snapshot(void) {
    buf_t b = {0};
    put_str(&b, "WKV1");
    put_u64(&b, STATE.len);
    for (size_t i = 0; i < STATE.len; i++) {
        put_u32(&b, (uint32_t)STATE.pairs[i].key.len);
        put_view(&b, view(STATE.pairs[i].key));
        put_u32(&b, (uint32_t)STATE.pairs[i].value.len);
        put_view(&b, view(STATE.pairs[i].value));
    }
    return b;
}

// Takes n bytes from *in, or says the snapshot is truncated.
static const char *take(view_t *in, size_t n, view_t *out) {
    if (in->len < n) return "kv snapshot is truncated";
    *out = (view_t){in->ptr, n};
    in->ptr += n;
    in->len -= n;
    return NULL;
}

static const char *take_string(view_t *in, view_t *out) {
    view_t len;
    const char *e = take(in, 4, &len);
    if (e) return e;
    uint32_t n = (uint32_t)len.ptr[0] | (uint32_t)len.ptr[1] << 8 | (uint32_t)len.ptr[2] << 16 |
                 (uint32_t)len.ptr[3] << 24;
    if ((e = take(in, n, out))) return e;
    return utf8(*out) ? NULL : "kv snapshot holds invalid UTF-8";
}

// Replaces the state with the snapshot's, or leaves it as it was and says why.
static const char *restore(view_t in) {
    view_t magic, count_bytes;
    const char *e = take(&in, 4, &magic);
    if (e) return e;
    if (!equals(magic, "WKV1")) return "not a kv snapshot (bad magic)";
    if ((e = take(&in, 8, &count_bytes))) return e;
    uint64_t count = 0;
    for (int i = 7; i >= 0; i--) count = count << 8 | count_bytes.ptr[i];
    kv_t next = {0};
    for (uint64_t i = 0; i < count; i++) {
        view_t key, value;
        if ((e = take_string(&in, &key)) || (e = take_string(&in, &value))) {
            clear(&next);
            return e;
        }
        set(&next, key, value);
    }
    if (in.len) {
        clear(&next);
        return "kv snapshot has trailing bytes";
    }
    clear(&STATE);
    STATE = next;
    return NULL;
}

// ---- The exports (wit-bindgen's C bindings, guest.h) --------------------------------------

static void reply(answer_t a, guest_list_u8_t *ret, guest_string_t *err) {
    if (a.ok) {
        ret->ptr = a.out.ptr;
        ret->len = a.out.len;
    } else {
        err->ptr = a.out.ptr;
        err->len = a.out.len;
    }
}

bool exports_waft_fsm_state_machine_apply(exports_waft_fsm_state_machine_apply_context_t *context,
                                          guest_list_u8_t *command, guest_list_u8_t *ret,
                                          guest_string_t *err) {
    (void)context;
    answer_t a = apply((view_t){command->ptr, command->len});
    guest_list_u8_free(command);
    reply(a, ret, err);
    return a.ok;
}

void exports_waft_fsm_state_machine_apply_batch(
    exports_waft_fsm_state_machine_list_entry_t *entries,
    exports_waft_fsm_state_machine_list_result_list_u8_string_t *ret) {
    ret->len = entries->len;
    ret->ptr = xmalloc(entries->len * sizeof *ret->ptr);
    for (size_t i = 0; i < entries->len; i++) {
        guest_list_u8_t *command = &entries->ptr[i].command;
        answer_t a = apply((view_t){command->ptr, command->len});
        ret->ptr[i].is_err = !a.ok;
        if (a.ok) {
            ret->ptr[i].val.ok = (guest_list_u8_t){a.out.ptr, a.out.len};
        } else {
            ret->ptr[i].val.err = (guest_string_t){a.out.ptr, a.out.len};
        }
    }
    exports_waft_fsm_state_machine_list_entry_free(entries);
}

bool exports_waft_fsm_state_machine_query(guest_list_u8_t *request, guest_list_u8_t *ret,
                                          guest_string_t *err) {
    answer_t a = query((view_t){request->ptr, request->len});
    guest_list_u8_free(request);
    reply(a, ret, err);
    return a.ok;
}

void exports_waft_fsm_state_machine_snapshot(guest_list_u8_t *ret) {
    buf_t b = snapshot();
    ret->ptr = b.ptr;
    ret->len = b.len;
}

bool exports_waft_fsm_state_machine_restore(guest_list_u8_t *data, guest_string_t *err) {
    const char *e = restore((view_t){data->ptr, data->len});
    guest_list_u8_free(data);
    if (!e) return true;
    guest_string_dup(err, e);
    return false;
}
