/**
 * Finds the Node.js binary the VM image carries as /opt/node/bin/node: the
 * pinned `node` package from the npm registry (which installs
 * `node-<platform>-<arch>` with the real binary), unless config or
 * AGENTVM_GUEST_NODE names another. It must be Node ≥ 26, the version VMs
 * promise their programs (and the Node preload and init are written for).
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { AgentVmError } from "../errors.ts";

export const MIN_GUEST_NODE_MAJOR = 26;

export interface GuestRuntime {
  /** Host path of the node binary. */
  binary: string;
  version: string;
}

const cache = new Map<string, Promise<GuestRuntime>>();

function findPinnedBinary(): string | undefined {
  const require = createRequire(import.meta.url);
  let nodePackageDir: string;
  try {
    nodePackageDir = dirname(require.resolve("node/package.json"));
  } catch {
    return undefined;
  }
  const platformPackage = `node-${process.platform}-${process.arch}`;
  const candidates = [
    join(nodePackageDir, "node_modules", platformPackage, "bin", "node"),
    join(nodePackageDir, "..", platformPackage, "bin", "node"),
    join(nodePackageDir, "bin", "node"),
  ];
  return candidates.find((path) => existsSync(path));
}

export function resolveGuestRuntime(configured?: string): Promise<GuestRuntime> {
  const requested = configured ?? process.env.AGENTVM_GUEST_NODE ?? "";
  let found = cache.get(requested);
  if (!found) {
    found = probe(requested || findPinnedBinary());
    cache.set(requested, found);
    found.catch(() => cache.delete(requested));
  }
  return found;
}

async function probe(binary: string | undefined): Promise<GuestRuntime> {
  if (!binary || !existsSync(binary)) {
    throw new AgentVmError(
      "GUEST_RUNTIME_MISSING",
      binary
        ? `guest Node.js binary ${binary} does not exist; fix runtime.node or AGENTVM_GUEST_NODE`
        : `the pinned guest Node.js was not found; run \`npm install\` (it installs the "node" package) or set AGENTVM_GUEST_NODE to a Node ≥ ${MIN_GUEST_NODE_MAJOR} binary`,
    );
  }
  let version: string;
  try {
    version = (await promisify(execFile)(binary, ["--version"], { timeout: 10_000 })).stdout.trim();
  } catch (error) {
    throw new AgentVmError("GUEST_RUNTIME_MISSING", `guest Node.js binary ${binary} does not run: ${(error as Error).message}`);
  }
  const major = Number(/^v(\d+)/.exec(version)?.[1]);
  if (!(major >= MIN_GUEST_NODE_MAJOR)) {
    throw new AgentVmError(
      "GUEST_RUNTIME_MISSING",
      `guest Node.js ${binary} is ${version}; guests need Node ≥ ${MIN_GUEST_NODE_MAJOR} (the version VMs promise their programs)`,
    );
  }
  return { binary, version };
}
