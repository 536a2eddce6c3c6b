/* The pod sandbox's process (the role of Kubernetes' pause container): holds the pod's
 * namespaces, reaps orphans, exits on SIGINT/SIGTERM. Built static by scripts/k8s/build-images.sh. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction s = {0}, r = {0};
  s.sa_handler = stop;
  r.sa_handler = reap;
  r.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGINT, &s, NULL) < 0 || sigaction(SIGTERM, &s, NULL) < 0 || sigaction(SIGCHLD, &r, NULL) < 0)
    return 1;
  for (;;) pause();
}
