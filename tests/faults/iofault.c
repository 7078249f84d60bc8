// A fault-injecting layer for the disk tests (issue 36), loaded into a `waft node` with
// LD_PRELOAD. It wraps the calls waft persists with (fsync, fdatasync, write, pwrite) and,
// while the control file names a fault, makes those on files under one directory fail the
// way a failing disk does:
//
//   fsync   every fsync and fdatasync fails with EIO (the data may or may not be on disk)
//   write   every write to a file under the directory fails with EIO
//   short   the next such write writes half of what it was given and says so; every one
//           after it fails with EIO (a torn write)
//
// Environment: WAFT_FAULT_CONTROL, the control file (its first word is the fault; absent or
// empty means none); WAFT_FAULT_DIR, the directory whose files fail (default: all files but
// stdout and stderr). The control file is read at each call, so a test arms and disarms a
// fault while the node runs. Built by tests/all/support/faults.rs with the system's cc.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

enum fault { NONE, FSYNC, WRITE, SHORT };

// The fault the control file names now.
static enum fault current(void) {
    const char *path = getenv("WAFT_FAULT_CONTROL");
    if (!path) return NONE;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NONE;
    char word[16] = {0};
    ssize_t n = read(fd, word, sizeof word - 1);
    close(fd);
    if (n <= 0) return NONE;
    if (strncmp(word, "fsync", 5) == 0) return FSYNC;
    if (strncmp(word, "write", 5) == 0) return WRITE;
    if (strncmp(word, "short", 5) == 0) return SHORT;
    return NONE;
}

// Whether `fd` is a regular file under WAFT_FAULT_DIR (never stdout or stderr: the node's
// log must still say what happened).
static int targeted(int fd) {
    if (fd <= 2) return 0;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    const char *dir = getenv("WAFT_FAULT_DIR");
    if (!dir) return 1;
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strncmp(target, dir, strlen(dir)) == 0;
}

// Set once a short write was made while `short` is armed; cleared when nothing is armed.
static atomic_int shorted;

// What a write of `count` bytes to `fd` does under the armed fault: -1 to fail with EIO, or
// the number of bytes to really write.
static ssize_t decide(int fd, size_t count) {
    if (!targeted(fd)) return (ssize_t)count;
    enum fault f = current();
    if (f == NONE) {
        atomic_store(&shorted, 0);
        return (ssize_t)count;
    }
    if (f == FSYNC) return (ssize_t)count;
    if (f == SHORT && count > 1 && atomic_exchange(&shorted, 1) == 0) return (ssize_t)(count / 2);
    return -1;
}

typedef int (*sync_fn)(int);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);

// The next definition of `name` (libc's), looked up once.
#define REAL(name, type)      \
    static type real_##name; \
    if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

int fsync(int fd) {
    REAL(fsync, sync_fn);
    if (current() == FSYNC) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync, sync_fn);
    if (current() == FSYNC) {
        errno = EIO;
        return -1;
    }
    return real_fdatasync(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write, write_fn);
    ssize_t n = decide(fd, count);
    if (n < 0) {
        errno = EIO;
        return -1;
    }
    return real_write(fd, buf, (size_t)n);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64, pwrite_fn);
    ssize_t n = decide(fd, count);
    if (n < 0) {
        errno = EIO;
        return -1;
    }
    return real_pwrite64(fd, buf, (size_t)n, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    return pwrite64(fd, buf, count, offset);
}
