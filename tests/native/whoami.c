/* Prints its real and effective uid: installed setuid-root by the tests. */
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("{\"uid\": %d, \"euid\": %d}\n", getuid(), geteuid());
    return 0;
}
