export { agentOS, agentOs, isVmDefinition } from "./definition.ts";
export type { AgentOsConfig, PreviewConfig, SoftwarePackage, VmDefinition } from "./definition.ts";
export { setup, Registry } from "./registry.ts";
export type { StartOptions, RunningServer } from "./registry.ts";
