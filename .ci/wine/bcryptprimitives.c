// Rust's std (1.78+) seeds its hash maps with ProcessPrng from bcryptprimitives.dll, which
// Debian's Wine 8 does not have: this stands in for it in CI (see .ci/wine/run).
#include <windows.h>
#include <ntsecapi.h>
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n; len -= n;
    }
    return TRUE;
}
