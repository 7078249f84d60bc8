// A C guest that misbehaves on command, to test that waft contains it (issue 36).
//
// State: up to 1,024 names with values, changed by `set NAME VALUE`, read by the query
// `get NAME`. Misbehaviour, as commands and (but `set`) as queries:
// - `print`:       printf to stdout (buffered by wasi-libc)
// - `print-flush`: a line to stdout and one to stderr, each flushed at once
// - `print-mb N`:  N MiB to stdout, flushed
// - `abort`:       abort() after a line on stderr (a trap)
// - `loop`:        loops until its fuel runs out
// - `bomb`:        mallocs and touches 4 MiB blocks until memory runs out
// - `recurse`:     recurses until the stack overflows
// - `huge N`:      replies with N bytes
// `snapshot` and `restore` (so every snapshot, rebase and restore) print a flushed line to
// stdout and to stderr.
//
// Built by tests/build.rs like examples/guests/kv-c (wit-bindgen c, clang, the preview1
// reactor adapter).

#include "guest.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NAMES 1024
#define MAX_WORD 256

static char names[MAX_NAMES][MAX_WORD];
static char values[MAX_NAMES][MAX_WORD];
static size_t count;

// The command's first three words (each cut at MAX_WORD - 1 bytes); how many it had.
static int split(const uint8_t *p, size_t len, char words[3][MAX_WORD]) {
    int n = 0;
    size_t i = 0;
    while (n < 3) {
        while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n')) i++;
        if (i == len) break;
        size_t w = 0;
        while (i < len && p[i] != ' ' && p[i] != '\t' && p[i] != '\n') {
            if (w < MAX_WORD - 1) words[n][w++] = (char)p[i];
            i++;
        }
        words[n][w] = 0;
        n++;
    }
    return n;
}

static void set_bytes(guest_list_u8_t *ret, const char *s, size_t len) {
    ret->ptr = malloc(len ? len : 1);
    if (!ret->ptr) abort();
    memcpy(ret->ptr, s, len);
    ret->len = len;
}

// The stack overflow: every path but an impossible one calls itself.
static int down(volatile int n) {
    volatile char frame[512];
    frame[n % 512] = (char)n;
    if (n == -1) return 0;
    return down(n + 1) + frame[(n * 7) % 512];
}

// Runs a misbehaviour named by `w`; true with its reply in `ret`, false when it names none.
static bool misbehave(char w[3][MAX_WORD], int n, guest_list_u8_t *ret) {
    if (n == 0) return false;
    if (!strcmp(w[0], "print")) {
        printf("hello from a guest\n");
    } else if (!strcmp(w[0], "print-flush")) {
        printf("hello\n");
        fflush(stdout);
        fprintf(stderr, "hello on stderr\n");
        fflush(stderr);
    } else if (!strcmp(w[0], "print-mb") && n == 2) {
        static char line[1024];
        memset(line, 'x', sizeof line - 1);
        for (long i = 0; i < atol(w[1]) * 1024; i++) fputs(line, stdout);
        fflush(stdout);
    } else if (!strcmp(w[0], "abort")) {
        fprintf(stderr, "deliberate abort\n");
        abort();
    } else if (!strcmp(w[0], "loop")) {
        volatile unsigned long i = 0;
        for (;;) i++;
    } else if (!strcmp(w[0], "bomb")) {
        for (;;) {
            char *p = malloc(4 << 20);
            if (!p) abort();
            memset(p, 1, 4 << 20);
        }
    } else if (!strcmp(w[0], "recurse")) {
        char text[32];
        snprintf(text, sizeof text, "%d", down(0));
        set_bytes(ret, text, strlen(text));
        return true;
    } else if (!strcmp(w[0], "huge") && n == 2) {
        size_t len = (size_t)atol(w[1]);
        ret->ptr = malloc(len ? len : 1);
        if (!ret->ptr) abort();
        memset(ret->ptr, 'x', len);
        ret->len = len;
        return true;
    } else {
        return false;
    }
    set_bytes(ret, "printed", 7);
    return true;
}

static bool refuse(guest_string_t *err, const char *why) {
    guest_string_dup(err, why);
    return false;
}

static bool run(const uint8_t *p, size_t len, bool is_query, guest_list_u8_t *ret,
                guest_string_t *err) {
    char w[3][MAX_WORD];
    int n = split(p, len, w);
    if (!is_query && n == 3 && !strcmp(w[0], "set")) {
        size_t i = 0;
        while (i < count && strcmp(names[i], w[1])) i++;
        if (i == MAX_NAMES) return refuse(err, "too many names");
        if (i == count) strcpy(names[count++], w[1]);
        strcpy(values[i], w[2]);
        set_bytes(ret, "OK", 2);
        return true;
    }
    if (is_query && n == 2 && !strcmp(w[0], "get")) {
        for (size_t i = 0; i < count; i++) {
            if (!strcmp(names[i], w[1])) {
                set_bytes(ret, values[i], strlen(values[i]));
                return true;
            }
        }
        return refuse(err, "no such name");
    }
    if (misbehave(w, n, ret)) return true;
    return refuse(err, "unknown command");
}

bool exports_waft_fsm_state_machine_apply(exports_waft_fsm_state_machine_apply_context_t *context,
                                          guest_list_u8_t *command, guest_list_u8_t *ret,
                                          guest_string_t *err) {
    (void)context;
    bool ok = run(command->ptr, command->len, false, ret, err);
    guest_list_u8_free(command);
    return ok;
}

void exports_waft_fsm_state_machine_apply_batch(
    exports_waft_fsm_state_machine_list_entry_t *entries,
    exports_waft_fsm_state_machine_list_result_list_u8_string_t *ret) {
    ret->len = entries->len;
    ret->ptr = malloc(entries->len * sizeof *ret->ptr + 1);
    if (!ret->ptr) abort();
    for (size_t i = 0; i < entries->len; i++) {
        guest_list_u8_t *command = &entries->ptr[i].command;
        guest_list_u8_t ok;
        guest_string_t err;
        bool is_ok = run(command->ptr, command->len, false, &ok, &err);
        ret->ptr[i].is_err = !is_ok;
        if (is_ok) {
            ret->ptr[i].val.ok = ok;
        } else {
            ret->ptr[i].val.err = err;
        }
    }
    exports_waft_fsm_state_machine_list_entry_free(entries);
}

bool exports_waft_fsm_state_machine_query(guest_list_u8_t *request, guest_list_u8_t *ret,
                                          guest_string_t *err) {
    bool ok = run(request->ptr, request->len, true, ret, err);
    guest_list_u8_free(request);
    return ok;
}

// NAME=VALUE lines in the order the names were first set (the same on every replica).
void exports_waft_fsm_state_machine_snapshot(guest_list_u8_t *ret) {
    printf("snapshot of %zu values\n", count);
    fflush(stdout);
    fprintf(stderr, "snapshot, on stderr\n");
    fflush(stderr);
    size_t len = 0;
    for (size_t i = 0; i < count; i++) len += strlen(names[i]) + strlen(values[i]) + 2;
    ret->ptr = malloc(len + 1);
    if (!ret->ptr) abort();
    ret->len = 0;
    for (size_t i = 0; i < count; i++) {
        ret->len += (size_t)sprintf((char *)ret->ptr + ret->len, "%s=%s\n", names[i], values[i]);
    }
}

// Reads NAME=VALUE lines: checks them all (`store` false), then stores them (`store` true).
static bool read_lines(const guest_list_u8_t *data, bool store) {
    size_t n = 0, i = 0;
    while (i < data->len) {
        size_t eq = i;
        while (eq < data->len && data->ptr[eq] != '=') eq++;
        size_t end = eq;
        while (end < data->len && data->ptr[end] != '\n') end++;
        if (eq == data->len || end == data->len || n == MAX_NAMES || eq - i >= MAX_WORD ||
            end - eq - 1 >= MAX_WORD) {
            return false;
        }
        if (store) {
            memcpy(names[n], data->ptr + i, eq - i);
            names[n][eq - i] = 0;
            memcpy(values[n], data->ptr + eq + 1, end - eq - 1);
            values[n][end - eq - 1] = 0;
        }
        n++;
        i = end + 1;
    }
    if (store) count = n;
    return true;
}

bool exports_waft_fsm_state_machine_restore(guest_list_u8_t *data, guest_string_t *err) {
    bool ok = read_lines(data, false) && read_lines(data, true);
    printf("restored %zu values\n", count);
    fflush(stdout);
    fprintf(stderr, "restored, on stderr\n");
    fflush(stderr);
    guest_list_u8_free(data);
    return ok || refuse(err, "not a snapshot of this guest");
}
