/**
 * Turns what goes wrong while building an image into IMAGE_BUILD_FAILED errors
 * whose message says what to do. One place so every step words them alike.
 */
import { AgentVmError } from "../errors.ts";

export const NO_APT_HINT =
  "the image is built from Debian packages with apt-get and dpkg-deb; on other systems set AGENTVM_IMAGE_DIR to a prebuilt image";

export function buildFailed(message: string, cause?: unknown): AgentVmError {
  return new AgentVmError("IMAGE_BUILD_FAILED", `building the VM image: ${message}`, { cause });
}

/** Maps a file-system error from a build step (ENOSPC, EACCES, …) to a message with a remedy. */
export function fileSystemFailure(step: string, error: unknown): AgentVmError {
  if (error instanceof AgentVmError) return error;
  const { code, path, message } = error as NodeJS.ErrnoException;
  if (code === "ENOSPC" || /No space left/.test(String(message))) {
    return buildFailed(`${step}: no space left on the device${path ? ` (${path})` : ""}; free some space or set AGENTVM_IMAGE_DIR to a disk with room (an image takes about 300 MB)`, error);
  }
  if (code === "EACCES" || code === "EPERM" || code === "EROFS" || code === "ENOTDIR") {
    return buildFailed(`${step}: ${path ?? "the image cache"} is not writable; fix its permissions or set AGENTVM_IMAGE_DIR to a writable directory`, error);
  }
  return buildFailed(`${step}: ${message}`, error);
}
