/**
 * What a guest command line may be. A VM runs `node` only, and no option or
 * environment variable may widen the permission model, open a debugger, run a
 * shell or load native code. The guest preload refuses to run if a permission
 * was widened anyway (defence in depth), so these rules are the first of two.
 */
import { AgentVmError } from "../errors.ts";
import { GUEST_NODE } from "../sandbox/bubblewrap.ts";

/** Flags that would widen a guest's permissions, open a debugger or run a shell (`--run`): never passed to a guest node. */
const FORBIDDEN_NODE_FLAGS = /^--(allow-|permission|experimental-permission|inspect|debug|security-revert|openssl|experimental-addon|snapshot-blob|build-snapshot|experimental-config-file|experimental-default-config-file|env-file|run\b|expose-internals|expose_internals)/;
/** The same, anywhere in NODE_OPTIONS (which allows quoting, so a token may start with a quote). */
const FORBIDDEN_IN_NODE_OPTIONS = new RegExp(`(^|[\\s"'])${FORBIDDEN_NODE_FLAGS.source.slice(1)}[^\\s"']*`);
/** Environment variables that make the loader or OpenSSL load a library of the guest's choosing. */
const NATIVE_CODE_ENV = /^(LD_|OPENSSL_|GCONV_PATH$)/;
/**
 * Node options that take their value as the next argument (`-e code`, `--require mod`),
 * from Node 26's option table. Node keeps parsing options after such a value, so
 * `node -e code --allow-worker` would grant the flag unless the walk skips values exactly.
 */
const NODE_VALUE_FLAGS = new Set([
  "-e", "--eval", "-p", "--print", "-pe", "-r", "--require", "--import", "-C", "--conditions", "--loader", "--experimental-loader",
  "--input-type", "--title", "--run", "--build-sea", "--experimental-sea-config", "--vfs-load", "--vfs-mount", "--max-old-space-size-percentage",
  "--experimental-package-map", "--test-concurrency", "--test-coverage-functions", "--bench-reporter", "--trace-require-module",
  "--experimental-test-tag-filter", "--test-coverage-include", "--test-coverage-exclude", "--inspect-publish-uid", "--inspect-port",
  "--cpu-prof-dir", "--watch-path", "--stack-trace-limit", "--build-snapshot-config", "--report-signal", "--cpu-prof-name",
  "--tls-keylog", "--heap-prof-dir", "--bench-samples", "--bench-name-pattern", "--localstorage-file", "--secure-heap-min",
  "--test-isolation", "--experimental-test-isolation", "--test-rerun-failures", "--test-coverage-lines", "--heap-prof-interval",
  "--cpu-prof-interval", "--disable-proto", "--trace-event-categories", "--v8-pool-size", "--test-reporter-destination",
  "--trace-event-file-pattern", "--unhandled-rejections", "--test-coverage-branches", "--network-family-autoselection-attempt-timeout",
  "--report-dir", "--report-directory", "--test-random-seed", "--test-global-setup", "--diagnostic-dir", "--bench-warmup",
  "--report-filename", "--tls-cipher-list", "--test-shard", "--redirect-warnings", "--max-http-header-size", "--test-name-pattern",
  "--use-largepages", "--test-timeout", "--icu-data-dir", "--heap-prof-name", "--test-reporter", "--secure-heap", "--test-skip-pattern",
  "--watch-kill-signal", "--bench-isolation", "--disable-warning", "--heapsnapshot-near-heap-limit", "--heapsnapshot-signal",
  "--dns-result-order", "--bench-reporter-destination",
]);
export const NODE_COMMANDS = new Set(["node", GUEST_NODE, "/usr/bin/node", "/usr/local/bin/node", "nodejs"]);

/**
 * Throws ENOENT for anything but node, EPERM for a forbidden flag or variable.
 * `direct` is true when the command line carries node options (or the
 * environment carries start-up variables), so it cannot run in a pre-started guest.
 */
export function checkNodeCommand(name: string, args: readonly string[], env: Readonly<Record<string, string>>, vmName: string): { direct: boolean } {
  if (!NODE_COMMANDS.has(name)) {
    throw new AgentVmError("ENOENT", `spawn ${name}: no such command in VM ${vmName}; the VM runs Node.js programs only — use spawn("node", ["script.js", …])`);
  }
  // Node's options run up to the script (or `-`, or `--`); values of value-taking options are skipped.
  let optionsEnd = 0;
  while (optionsEnd < args.length) {
    const arg = args[optionsEnd]!;
    if (!arg.startsWith("-") || arg === "-") break;
    if (arg === "--") {
      optionsEnd++;
      break;
    }
    // Node reads `_` in an option name as `-` (`--allow_net` is `--allow-net`).
    optionsEnd += !arg.includes("=") && NODE_VALUE_FLAGS.has(arg.replace(/_/g, "-")) ? 2 : 1;
  }
  const flags = args.slice(0, optionsEnd);
  const forbidden = flags.find((flag) => FORBIDDEN_NODE_FLAGS.test(flag.replace(/_/g, "-")));
  const nodeOptions = env.NODE_OPTIONS ?? "";
  const forbiddenOption = FORBIDDEN_IN_NODE_OPTIONS.exec(nodeOptions.replace(/_/g, "-"))?.[0].trim().replace(/^["']/, "");
  if (forbidden || forbiddenOption) {
    throw new AgentVmError("EPERM", `spawn node: the flag ${forbidden ?? forbiddenOption} is not allowed in a VM; guests run under a fixed permission model`);
  }
  // The dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH…) and OpenSSL (OPENSSL_CONF providers) load
  // native code named by these before Node's permission model exists.
  const loaderVariable = Object.keys(env).find((key) => NATIVE_CODE_ENV.test(key));
  if (loaderVariable) {
    throw new AgentVmError("EPERM", `spawn node: the environment variable ${loaderVariable} is not allowed in a VM; it would load native code into the guest`);
  }
  // Node reads NODE_* and UV_* variables (NODE_OPTIONS, NODE_EXTRA_CA_CERTS, …) only at start-up, so a
  // program that sets them cannot use an already started guest.
  const startupEnv = Object.keys(env).some((key) => key.startsWith("NODE_") || key.startsWith("UV_"));
  return { direct: flags.length > 0 || args.length === 0 || startupEnv };
}
