{{/* The pod spec of one engine: a single-pod replica (role "single"), or the leader / a worker of a multi-pod
group (LeaderWorkerSet). Called with (dict "root" $ "u" <engine unit> "role" "single|leader|worker"). */}}
{{- define "private-llm.enginePodSpec" -}}
{{- $root := .root -}}
{{- $u := .u -}}
{{- $role := .role -}}
{{- $s := $u.settings -}}
{{- $p := $u.probes -}}
{{- $g := $u.group -}}
{{- $creds := include "private-llm.s3Credentials" $root | fromJson -}}
{{- $endpoint := include "private-llm.s3Endpoint" $root -}}
{{- $port := int $root.Values.engine.port -}}
{{- $isS3 := hasPrefix "s3://" $u.source -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $u.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $u.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ add (int $u.preStopSleepSeconds) (int $u.drainSeconds) 10 }}
securityContext:
  {{- toYaml $root.Values.engine.podSecurityContext | nindent 2 }}
{{- if $isS3 }}
initContainers:
  # Pull every file of the model from S3 and verify it against the manifest's sha256 digests before
  # vLLM starts. Idempotent: files already in the cache and verified are kept.
  - name: pull
    image: {{ include "private-llm.image" (dict "root" $root "image" $root.Values.engine.image) }}
    imagePullPolicy: {{ $root.Values.engine.image.pullPolicy }}
    command: ["llm-engine"]
    args: ["pull", {{ $u.source | quote }}, "--cache-dir", "/cache"]
    env:
      {{- include "private-llm.engineS3Env" (dict "creds" $creds "endpoint" $endpoint "root" $root) | trim | nindent 6 }}
      - name: ENGINE_PULL_CONCURRENCY
        value: {{ $s.pullConcurrency | quote }}
      {{- with $u.pullExtraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- toYaml $u.pullResources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.engine.securityContext | nindent 6 }}
    volumeMounts:
      - name: cache
        mountPath: /cache
      {{- with (include "private-llm.s3CaMount" $root | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $u.pullExtraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}
containers:
  - name: engine
    image: {{ include "private-llm.image" (dict "root" $root "image" $root.Values.engine.image) }}
    imagePullPolicy: {{ $root.Values.engine.image.pullPolicy }}
    command: ["llm-engine"]
    args: ["run"]
    {{- if ne $role "worker" }}
    ports:
      - name: http
        containerPort: {{ $port }}
        protocol: TCP
      {{- if eq $role "leader" }}
      # The weights digest the leader verified (GET /group); workers compare theirs before joining.
      - name: group
        containerPort: {{ int $g.port }}
        protocol: TCP
      {{- end }}
    {{- end }}
    env:
      - name: ENGINE_MODEL
        value: {{ $u.source | quote }}
      - name: ENGINE_SERVED_MODEL_NAME
        value: {{ $u.servedModelName | quote }}
      - name: ENGINE_HOST
        value: "0.0.0.0"
      - name: ENGINE_PORT
        value: {{ $port | quote }}
      - name: ENGINE_DEVICE
        value: cuda
      - name: ENGINE_CACHE_DIR
        value: /cache
      - name: ENGINE_TENSOR_PARALLEL_SIZE
        value: {{ int $s.tensorParallelSize | quote }}
      - name: ENGINE_PIPELINE_PARALLEL_SIZE
        value: {{ int $s.pipelineParallelSize | quote }}
      {{- with $s.quantization }}
      - name: ENGINE_QUANTIZATION
        value: {{ . | quote }}
      {{- end }}
      {{- if gt (int $s.maxModelLen) 0 }}
      - name: ENGINE_MAX_MODEL_LEN
        value: {{ int $s.maxModelLen | quote }}
      {{- end }}
      {{- if $s.gpuMemoryUtilization }}
      - name: ENGINE_GPU_MEMORY_UTILIZATION
        value: {{ $s.gpuMemoryUtilization | quote }}
      {{- end }}
      {{- if gt (int $s.maxNumBatchedTokens) 0 }}
      - name: ENGINE_MAX_NUM_BATCHED_TOKENS
        value: {{ int $s.maxNumBatchedTokens | quote }}
      {{- end }}
      {{- if gt (int $s.maxNumSeqs) 0 }}
      - name: ENGINE_MAX_NUM_SEQS
        value: {{ int $s.maxNumSeqs | quote }}
      {{- end }}
      - name: ENGINE_DTYPE
        value: {{ $s.dtype | quote }}
      {{- with $s.kvCacheDtype }}
      - name: ENGINE_KV_CACHE_DTYPE
        value: {{ . | quote }}
      {{- end }}
      - name: ENGINE_ENABLE_PREFIX_CACHING
        value: {{ $s.enablePrefixCaching | quote }}
      {{- with $s.runner }}
      - name: ENGINE_RUNNER
        value: {{ . | quote }}
      {{- end }}
      {{- with $s.toolCallParser }}
      - name: ENGINE_TOOL_CALL_PARSER
        value: {{ . | quote }}
      {{- end }}
      {{- if $s.enableAutoToolChoice }}
      - name: ENGINE_ENABLE_AUTO_TOOL_CHOICE
        value: "true"
      {{- end }}
      {{- if eq (toString $s.toolCallStructuralTags) "false" }}
      - name: ENGINE_TOOL_CALL_STRUCTURAL_TAGS
        value: "false"
      {{- end }}
      {{- if $s.structuredOutputsDisableAnyWhitespace }}
      - name: ENGINE_STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE
        value: "true"
      {{- end }}
      {{- if $s.responsesStore }}
      - name: ENGINE_RESPONSES_STORE
        value: "true"
      {{- end }}
      {{- if $s.allowRuntimeLora }}
      - name: ENGINE_ALLOW_RUNTIME_LORA
        value: "true"
      {{- end }}
      {{- if gt (int ($s.maxLoraRank | default 0)) 0 }}
      - name: ENGINE_MAX_LORA_RANK
        value: {{ int $s.maxLoraRank | quote }}
      {{- end }}
      {{- with $s.extraArgs }}
      - name: ENGINE_EXTRA_ARGS
        value: {{ . | quote }}
      {{- end }}
      - name: ENGINE_PULL_CONCURRENCY
        value: {{ $s.pullConcurrency | quote }}
      - name: ENGINE_DRAIN_TIMEOUT
        value: {{ $u.drainSeconds | quote }}
      - name: ENGINE_STARTUP_TIMEOUT
        value: {{ mul (int $p.startup.periodSeconds) (int $p.startup.failureThreshold) | quote }}
      # Weights come verified from the cache: never reach out to a model hub.
      - name: HF_HUB_OFFLINE
        value: "1"
      {{- include "private-llm.engineS3Env" (dict "creds" $creds "endpoint" $endpoint "root" $root) | trim | nindent 6 }}
      {{- if ne $role "single" }}
      # One replica over {{ int $g.size }} pods (engine/group.py): role, size, index and the leader's address come
      # from the LeaderWorkerSet's LWS_* variables.
      - name: ENGINE_GROUP_LAUNCHER
        value: {{ $g.launcher | quote }}
      - name: ENGINE_GROUP_PORT
        value: {{ int $g.port | quote }}
      {{- if ne $g.launcher "dp" }}
      - name: ENGINE_GPUS_PER_POD
        value: {{ int $u.gpuCount | quote }}
      {{- else }}
      - name: ENGINE_DATA_PARALLEL_SIZE
        value: {{ int $g.dataParallelSize | quote }}
      {{- end }}
      {{- if $g.enableExpertParallel }}
      - name: ENGINE_ENABLE_EXPERT_PARALLEL
        value: "true"
      {{- end }}
      # vLLM and NCCL announce this pod's own address to the group.
      - name: VLLM_HOST_IP
        valueFrom:
          fieldRef:
            fieldPath: status.podIP
      {{- if not $g.nvlinkMulticast }}
      # NVLink multicast (NVLS) off: not every GPU node or driver offers it, and NCCL fails at init without it.
      - name: NCCL_NVLS_ENABLE
        value: "0"
      {{- end }}
      {{- range $k, $v := $g.ncclEnv }}
      - name: {{ $k }}
        value: {{ $v | quote }}
      {{- end }}
      {{- end }}
      {{- with $u.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if ne $role "worker" }}
    # vLLM's /health: startup allows for loading weights and compiling; readiness takes a replica out of
    # the headless Service's DNS; liveness restarts a hung engine.
    startupProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: {{ $p.startup.periodSeconds }}
      timeoutSeconds: {{ $p.startup.timeoutSeconds }}
      failureThreshold: {{ $p.startup.failureThreshold }}
    readinessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: {{ $p.readiness.periodSeconds }}
      timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
      failureThreshold: {{ $p.readiness.failureThreshold }}
    livenessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: {{ $p.liveness.periodSeconds }}
      timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
      failureThreshold: {{ $p.liveness.failureThreshold }}
    lifecycle:
      preStop:
        # Leave the Service's DNS first (the gateway stops picking this replica), then drain on SIGTERM.
        exec:
          command: ["sleep", "{{ $u.preStopSleepSeconds }}"]
    {{- end }}
    resources:
      {{- $gpu := dict "nvidia.com/gpu" (int $u.gpuCount) }}
      {{- if and (ne $role "single") $g.rdma.resource }}
      {{- $_ := set $gpu $g.rdma.resource (int $g.rdma.count) }}
      {{- end }}
      requests:
        {{- merge (omit ($u.resources.requests | default dict) "nvidia.com/gpu") $gpu | toYaml | nindent 8 }}
      limits:
        {{- merge (omit ($u.resources.limits | default dict) "nvidia.com/gpu") $gpu | toYaml | nindent 8 }}
    securityContext:
      {{- $sc := deepCopy $root.Values.engine.securityContext }}
      {{- if and (ne $role "single") $g.rdma.resource }}
      {{- /* RDMA registers (pins) GPU and host memory. */}}
      {{- $caps := $sc.capabilities | default dict }}
      {{- $_ := set $caps "add" (concat ($caps.add | default list) (list "IPC_LOCK") | uniq) }}
      {{- $_ := set $sc "capabilities" $caps }}
      {{- end }}
      {{- toYaml $sc | nindent 6 }}
    volumeMounts:
      - name: cache
        mountPath: /cache
      - name: dshm
        mountPath: /dev/shm
      {{- with (include "private-llm.s3CaMount" $root | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $u.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $u.shmSize | toYaml }}
  {{- if eq $u.cache.type "emptyDir" }}
  - name: cache
    emptyDir:
      {{- if $u.cache.sizeLimit }}
      sizeLimit: {{ $u.cache.sizeLimit | toYaml }}
      {{- else }}
      {}
      {{- end }}
  {{- else if eq $u.cache.type "existingClaim" }}
  - name: cache
    persistentVolumeClaim:
      claimName: {{ $u.cache.claimName }}
  {{- else if eq $u.workload "Deployment" }}
  - name: cache
    persistentVolumeClaim:
      claimName: {{ $u.resName }}-cache
  {{- end }}
  {{- with (include "private-llm.s3CaVolume" $root | trim) }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with $u.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $u.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $u.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $u.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Labels and annotations of an engine pod (dict "root" $ "u" <engine unit> "role" "single|leader|worker"). */}}
{{- define "private-llm.enginePodMeta" -}}
{{- $root := .root -}}
{{- $u := .u -}}
labels:
  {{- include "private-llm.labels" (dict "root" $root "component" "engine") | nindent 2 }}
  private-llm/engine: {{ $u.resName }}
  private-llm/model: {{ $u.modelKey }}
  {{- with $u.pool }}
  private-llm/pool: {{ . }}
  {{- end }}
  {{- if ne .role "single" }}
  private-llm/group-role: {{ .role }}
  {{- end }}
  {{- with $u.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := deepCopy ($u.podAnnotations | default dict) }}
{{- if and $root.Values.s3.accessKeyId (not $root.Values.s3.existingSecret) }}
{{- $_ := set $annotations "checksum/s3" (include (print $root.Template.BasePath "/s3-secret.yaml") $root | sha256sum) }}
{{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The weight cache's claim template (a StatefulSet or a LeaderWorkerSet: one claim per pod). */}}
{{- define "private-llm.engineCacheClaim" -}}
- metadata:
    name: cache
  spec:
    accessModes:
      {{- toYaml .cache.accessModes | nindent 6 }}
    {{- with .cache.storageClassName }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ .cache.size | toYaml }}
{{- end -}}
