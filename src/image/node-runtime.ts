/**
 * Lays out the pinned guest Node and npm under the image's /opt/node, as a
 * Node tarball would: bin/node, lib/node_modules/npm, bin/npm and bin/npx.
 */
import { cp, link, mkdir, copyFile, symlink } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { resolveGuestRuntime } from "../sandbox/guest-runtime.ts";

export interface NodeRuntime {
  binary: string;
  version: string;
  /** Host directory of the installed npm package. */
  npmDir: string;
  npmVersion: string;
}

/** Finds the pinned node (the `node` package) and the pinned npm (the `npm` package). */
export async function findNodeRuntime(configured?: string): Promise<NodeRuntime> {
  const { binary, version } = await resolveGuestRuntime(configured);
  const require = createRequire(import.meta.url);
  const npmManifest = require.resolve("npm/package.json");
  const npmVersion = (require(npmManifest) as { version: string }).version;
  return { binary, version, npmDir: dirname(npmManifest), npmVersion };
}

export async function installNodeRuntime(runtime: NodeRuntime, root: string): Promise<void> {
  const bin = join(root, "opt/node/bin");
  await mkdir(bin, { recursive: true });
  // 150 MB: share the inode when the cache is on the same file system.
  await link(runtime.binary, join(bin, "node")).catch(() => copyFile(runtime.binary, join(bin, "node")));
  const npm = join(root, "opt/node/lib/node_modules/npm");
  await cp(runtime.npmDir, npm, { recursive: true, verbatimSymlinks: true });
  await symlink("../lib/node_modules/npm/bin/npm-cli.js", join(bin, "npm"));
  await symlink("../lib/node_modules/npm/bin/npx-cli.js", join(bin, "npx"));
}
