/**
 * Times one ensureImage() call in a fresh process (the image is memoized per
 * process, so only a new process shows what a server's first VM pays) and
 * prints `{ ms, root, id }` as JSON. AGENTVM_IMAGE_DIR chooses the cache.
 */
import { ensureImage } from "../src/image/index.ts";

const progress: string[] = [];
const started = performance.now();
const image = await ensureImage({ onProgress: (line) => void progress.push(line) });
const ms = performance.now() - started;
process.stdout.write(`${JSON.stringify({ ms, root: image.root, id: image.id, progress })}\n`);
