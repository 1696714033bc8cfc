/* Forks until the kernel refuses, and keeps trying. */
#include <unistd.h>
int main(void) {
    for (;;) {
        if (fork() == 0) {
            for (;;) pause();
        }
    }
}
