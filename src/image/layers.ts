/**
 * Software layers: an npm package installed globally into its own prefix by the
 * image's npm and pinned node, cached per machine, mounted read-only at
 * /opt/software/<name> with its bin/ on PATH.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { lstat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { buildOnce, exists, imageCacheDir } from "./cache.ts";
import { buildFailed } from "./failure.ts";
import type { NodeRuntime } from "./node-runtime.ts";
import { layerMountPoint, npmSoftware, type SoftwareDescriptor } from "./software.ts";

const run = promisify(execFile);

export interface ImageLayer {
  name: string;
  /** Host directory of the layer. */
  dir: string;
  /** Where it mounts in the VM. */
  mountAt: string;
  /** PATH entries it adds, inside the VM. */
  path: string[];
}

/** Builds (once per machine) the layer of one software entry; undefined for software the base already has. */
export async function ensureLayer(
  software: SoftwareDescriptor,
  imageRoot: string,
  runtime: NodeRuntime,
  progress: (line: string) => void,
): Promise<ImageLayer | undefined> {
  const npm = npmSoftware(software);
  if (!npm) return undefined;
  const hash = createHash("sha256").update(JSON.stringify([npm, runtime.version, runtime.npmVersion])).digest("hex").slice(0, 12);
  const dir = join(imageCacheDir(), "software", `${software.name}-${npm.version}-${hash}`);
  if (!(await exists(dir))) {
    await buildOnce(dir, async (tmp) => {
      const started = performance.now();
      progress(`agentvm: building software layer ${software.name}: npm install ${npm.package}@${npm.version}…`);
      const node = join(imageRoot, "opt/node/bin/node");
      const cli = join(imageRoot, "opt/node/lib/node_modules/npm/bin/npm-cli.js");
      // Install scripts stay off: they would run on the host, outside any sandbox.
      const args = [cli, "install", "--global", "--prefix", tmp, "--no-audit", "--no-fund", "--ignore-scripts", "--no-update-notifier", `${npm.package}@${npm.version}`];
      try {
        await run(node, args, { maxBuffer: 64 << 20, env: { ...process.env, npm_config_loglevel: "error" } });
      } catch (error) {
        const stderr = String((error as { stderr?: string }).stderr ?? "").trim().split("\n").slice(-3).join(" ");
        const network = /ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|network/i.test(stderr);
        throw buildFailed(
          `npm install ${npm.package}@${npm.version} failed${network ? " (no network? check the registry and proxy settings)" : ""}: ${stderr || (error as Error).message}`,
          error,
        );
      }
      const bins = await lstat(join(tmp, "bin")).catch(() => undefined);
      if (!bins?.isDirectory()) throw buildFailed(`${npm.package}@${npm.version} installed no programs (no bin/)`);
      progress(`agentvm: software layer ${software.name} done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
    });
  }
  const mountAt = layerMountPoint(software.name);
  return { name: software.name, dir, mountAt, path: [`${mountAt}/bin`] };
}
