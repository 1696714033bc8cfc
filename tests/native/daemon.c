/* Leaves a grandchild behind: double fork + setsid. The grandchild runs
 * `sh -c 'sleep 300' MARKER` (MARKER = argv[1], visible in its command line
 * for the test to look for on the host); the tool itself exits 0 at once. */
#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        if (fork() == 0) {
            char *sh[] = {"/bin/sh", "-c", "sleep 300", argc > 1 ? argv[1] : "marker", 0};
            execv("/bin/sh", sh);
            _exit(1);
        }
        _exit(0);
    }
    waitpid(pid, 0, 0);
    puts("{\"daemonized\": true}");
    return 0;
}
