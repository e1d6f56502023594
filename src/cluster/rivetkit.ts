/**
 * Loads RivetKit (the runner) and finds the Rivet Engine binary it brings.
 * Neither is a dependency of the main package: a single-node install never
 * downloads them. They live in `cluster/node_modules` (`npm run cluster:install`),
 * or wherever the application itself installed `rivetkit`. Everything cluster
 * mode needs from them goes through here, so a missing install fails in one
 * place with CLUSTER_UNAVAILABLE and the command that fixes it.
 */
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import { AgentVmError } from "../errors.ts";

/** The rivetkit version the cluster mode was built and measured against. */
export const RIVETKIT_VERSION = "2.3.19";

const INSTALL_HINT = `run \`npm run cluster:install\` in the agentvm package (it installs rivetkit@${RIVETKIT_VERSION} and the Rivet Engine binary into cluster/node_modules), or add rivetkit@${RIVETKIT_VERSION} to your application`;

/** Where to look for rivetkit: the cluster runtime package first, then the application. */
function resolvers(): NodeJS.Require[] {
  const here = new URL("../../cluster/package.json", import.meta.url);
  return [createRequire(here), createRequire(pathToFileURL(`${process.cwd()}/package.json`))];
}

function resolve(specifier: string): string | undefined {
  for (const require of resolvers()) {
    try {
      return require.resolve(specifier);
    } catch {
      // Try the next place.
    }
  }
  return undefined;
}

/** The subset of rivetkit this adapter uses (typed here so the main package needs no rivetkit types). */
export interface RivetKit {
  actor(definition: Record<string, unknown>): unknown;
  setup(config: Record<string, unknown>): { start(): void; startEnvoy?(): void };
}

let loaded: Promise<RivetKit> | undefined;

export function loadRivetKit(): Promise<RivetKit> {
  loaded ??= (async () => {
    const path = resolve("rivetkit");
    if (!path) throw new AgentVmError("CLUSTER_UNAVAILABLE", `cluster mode needs rivetkit, which is not installed: ${INSTALL_HINT}`);
    try {
      return (await import(pathToFileURL(path).href)) as RivetKit;
    } catch (error) {
      throw new AgentVmError("CLUSTER_UNAVAILABLE", `rivetkit is installed at ${path} but does not load (${(error as Error).message}); reinstall it: ${INSTALL_HINT}`, { cause: error });
    }
  })();
  loaded.catch(() => (loaded = undefined));
  return loaded;
}

/** The Rivet Engine binary: RIVET_ENGINE_BINARY when set, else the one @rivetkit/engine-cli installed for this platform. */
export function engineBinaryPath(): string {
  const override = process.env.RIVET_ENGINE_BINARY;
  if (override) {
    if (!existsSync(override)) throw new AgentVmError("CLUSTER_UNAVAILABLE", `RIVET_ENGINE_BINARY=${override} does not exist`);
    return override;
  }
  const cli = resolve("@rivetkit/engine-cli");
  if (!cli) throw new AgentVmError("CLUSTER_UNAVAILABLE", `the Rivet Engine binary is not installed: ${INSTALL_HINT}`);
  try {
    const { getEnginePath } = createRequire(cli)(cli) as { getEnginePath(): string };
    return getEnginePath();
  } catch (error) {
    throw new AgentVmError("CLUSTER_UNAVAILABLE", `no Rivet Engine binary for ${process.platform}-${process.arch} (${(error as Error).message}): ${INSTALL_HINT}`, { cause: error });
  }
}

/** True when rivetkit can be found (tests use this to skip with a reason). */
export function clusterRuntimeInstalled(): boolean {
  return resolve("rivetkit") !== undefined && resolve("@rivetkit/engine-cli") !== undefined;
}
