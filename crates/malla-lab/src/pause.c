/* The lab's pod sandbox ("pause") process, built static with musl-gcc by malla_lab::kubelet:
 * it holds the pod's namespaces, reaps orphans (it is PID 1 of a pod sharing its PID
 * namespace) and exits on SIGINT/SIGTERM, as Kubernetes' own pause.c does. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction a = {0};
  a.sa_handler = stop;
  sigaction(SIGINT, &a, NULL);
  sigaction(SIGTERM, &a, NULL);
  a.sa_handler = reap;
  a.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &a, NULL);
  for (;;) pause();
  return 0;
}
