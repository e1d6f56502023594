// Builds the VM image (and software layers) into the image cache, with progress:
//   npm run image [-- --software pi] [--quiet]
// --quiet (npm start/test/bench run it first) prints only the build's progress, and only when it builds.
import { parseArgs } from "node:util";
import { ensureImage, imageCacheDir } from "../src/image/index.ts";
import { treeSize } from "../src/image/image.ts";

const { values } = parseArgs({ options: { software: { type: "string", multiple: true }, quiet: { type: "boolean" } } });
const started = performance.now();
try {
  const image = await ensureImage({ software: values.software ?? [] });
  if (values.quiet) process.exit(0);
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.log(`id      ${image.id}`);
  console.log(`path    ${image.root}`);
  console.log(`size    ${Math.round((await treeSize(image.root)) / 1e6)} MB`);
  for (const layer of image.layers) console.log(`layer   ${layer.name}: ${layer.dir} → ${layer.mountAt} (${Math.round((await treeSize(layer.dir)) / 1e6)} MB)`);
  console.log(`PATH    ${image.path}`);
  console.log(`time    ${seconds} s`);
  console.log(`cache   ${imageCacheDir()}`);
} catch (error) {
  console.error(`${(error as { code?: string }).code ?? "ERROR"}: ${(error as Error).message}`);
  process.exitCode = 1;
}
