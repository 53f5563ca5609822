{{/* Names and labels. */}}
{{- define "private-llm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "private-llm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "private-llm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "gateway"). */}}
{{- define "private-llm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "private-llm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "private-llm.labels" -}}
helm.sh/chart: {{ include "private-llm.chart" .root }}
{{ include "private-llm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: private-llm
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "private-llm.gatewayName" -}}
{{- printf "%s-gateway" (include "private-llm.fullname" .) -}}
{{- end -}}

{{- define "private-llm.gatewayServiceAccount" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "private-llm.gatewayName" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "private-llm.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Secrets: names of the objects holding each credential, chart-managed or existing. */}}
{{- define "private-llm.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "private-llm.fullname" .)) .Values.gateway.apiKeysExistingSecret.name -}}
{{- end -}}

{{- define "private-llm.hasApiKeys" -}}
{{- if or .Values.gateway.apiKeys .Values.gateway.apiKeysExistingSecret.name -}}true{{- end -}}
{{- end -}}

{{- define "private-llm.minioSecret" -}}
{{- default (printf "%s-minio" (include "private-llm.fullname" .)) .Values.minio.existingSecret -}}
{{- end -}}

{{- define "private-llm.minioHost" -}}
{{- printf "%s-minio.%s.svc.%s" (include "private-llm.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* S3 endpoint: explicit, else the bundled MinIO. */}}
{{- define "private-llm.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s:9000" (include "private-llm.minioHost" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret and keys the engines read S3 credentials from ("" when none: IAM/IRSA/instance roles). */}}
{{- define "private-llm.s3Credentials" -}}
{{- if .Values.s3.existingSecret -}}
{{- toJson (dict "name" .Values.s3.existingSecret "id" .Values.s3.existingSecretKeys.accessKeyId "secret" .Values.s3.existingSecretKeys.secretAccessKey) -}}
{{- else if .Values.s3.accessKeyId -}}
{{- toJson (dict "name" (printf "%s-s3" (include "private-llm.fullname" .)) "id" "AWS_ACCESS_KEY_ID" "secret" "AWS_SECRET_ACCESS_KEY") -}}
{{- else if .Values.minio.enabled -}}
{{- toJson (dict "name" (include "private-llm.minioSecret" .) "id" "rootUser" "secret" "rootPassword") -}}
{{- else -}}
{{- toJson (dict) -}}
{{- end -}}
{{- end -}}

{{- define "private-llm.redisName" -}}
{{- printf "%s-redis" (include "private-llm.fullname" .) -}}
{{- end -}}

{{- define "private-llm.redisPasswordSecret" -}}
{{- default (include "private-llm.redisName" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* Environment entries that give the gateway its Redis URL (bundled or external); empty when none. */}}
{{- define "private-llm.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "private-llm.redisPasswordSecret" . }}
      key: {{ .Values.redis.auth.existingSecretPasswordKey }}
- name: {{ .Values.redis.envVar }}
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc.%s:6379/0" (include "private-llm.redisName" .) .Release.Namespace .Values.clusterDomain | quote }}
{{- else if or .Values.redis.external.url .Values.redis.external.existingSecret }}
- name: {{ .Values.redis.envVar }}
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-redis-url" (include "private-llm.fullname" .)) .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end -}}

{{/*
Engine units: one per model, or one per pool of a model (blue/green). Each unit is the model entry merged over
engine.defaults (and the pool over the model), plus computed names. Returned as JSON {"units": [...]}.
*/}}
{{- define "private-llm.engineUnits" -}}
{{- $root := . -}}
{{- $full := include "private-llm.fullname" . -}}
{{- $units := list -}}
{{- $names := dict -}}
{{- $publicNames := dict -}}
{{- range $i, $m := .Values.models -}}
{{- if hasKey $publicNames $m.name -}}
{{- fail (printf "models[%d]: the model name %q is used twice" $i $m.name) -}}
{{- end -}}
{{- $_ := set $publicNames $m.name true -}}
{{- $key := regexReplaceAll "[^a-z0-9-]+" (default $m.name $m.key | lower) "-" | trimAll "-" | trunc 24 | trimSuffix "-" -}}
{{- $model := mergeOverwrite (deepCopy $root.Values.engine.defaults) (omit $m "pools" "upstreams" "name" "key") -}}
{{- $pools := $m.pools | default (list (dict)) -}}
{{- range $j, $p := $pools -}}
{{- $u := mergeOverwrite (deepCopy $model) (omit $p "name" "weight") -}}
{{- $suffix := $key -}}
{{- if $p.name -}}
{{- $suffix = printf "%s-%s" $key (regexReplaceAll "[^a-z0-9-]+" ($p.name | lower) "-" | trimAll "-") -}}
{{- end -}}
{{- /* 52: a StatefulSet's name plus its controller-revision-hash must fit a 63-character label. */ -}}
{{- /* The model/pool suffix is kept whole (key <= 24, pool <= 20 characters); the release prefix gives way. */ -}}
{{- $resName := printf "%s-%s" ($full | trunc (int (sub 51 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- if hasKey $names $resName -}}
{{- fail (printf "models[%d] (%s): its engine name %q collides with another model or pool; set a distinct `key`" $i $m.name $resName) -}}
{{- end -}}
{{- $_ := set $names $resName true -}}
{{- if not $u.source -}}
{{- fail (printf "models[%d] (%s): `source` is required (s3://bucket/prefix of the verified weights)" $i $m.name) -}}
{{- end -}}
{{- $s := $u.settings -}}
{{- $minGpus := mul (int $s.tensorParallelSize) (int $s.pipelineParallelSize) -}}
{{- $gpus := int $u.gpus | default $minGpus -}}
{{- $g := $u.group -}}
{{- $groupSize := int $g.size -}}
{{- if gt $groupSize 1 -}}
{{- /* One replica = a LeaderWorkerSet group of groupSize pods (engine/group.py). */ -}}
{{- $_ := set $u "workload" "LeaderWorkerSet" -}}
{{- $perPod := int $g.gpusPerPod -}}
{{- if eq $g.launcher "dp" -}}
{{- if or (lt (int $g.dataParallelSize) $groupSize) (ne (mod (int $g.dataParallelSize) $groupSize) 0) -}}
{{- fail (printf "models[%d] (%s): group.dataParallelSize=%d must be a multiple of group.size=%d (dp launcher)" $i $m.name (int $g.dataParallelSize) $groupSize) -}}
{{- end -}}
{{- if lt $perPod 1 -}}
{{- fail (printf "models[%d] (%s): group.gpusPerPod is required with the dp launcher" $i $m.name) -}}
{{- end -}}
{{- else -}}
{{- if eq $perPod 0 -}}
{{- $perPod = div $minGpus $groupSize -}}
{{- end -}}
{{- if ne (int $minGpus) (mul $perPod $groupSize) -}}
{{- fail (printf "models[%d] (%s): tensorParallelSize x pipelineParallelSize = %d must equal group.size x group.gpusPerPod = %d x %d" $i $m.name (int $minGpus) $groupSize $perPod) -}}
{{- end -}}
{{- end -}}
{{- $gpus = $perPod -}}
{{- else if lt (int $gpus) (int $minGpus) -}}
{{- fail (printf "models[%d] (%s): gpus=%d is less than tensorParallelSize x pipelineParallelSize = %d" $i $m.name $gpus $minGpus) -}}
{{- end -}}
{{- range $flag := list "--host" "--port" "--served-model-name" "--dtype" "--max-model-len" "--gpu-memory-utilization" "--max-num-seqs" "--max-num-batched-tokens" "--tensor-parallel-size" "--pipeline-parallel-size" "--quantization" "--enforce-eager" "--kv-cache-memory-bytes" "--api-key" "--shutdown-timeout" "--distributed-executor-backend" "--nnodes" "--node-rank" "--master-addr" "--master-port" "--headless" "--data-parallel-size" "--data-parallel-size-local" "--data-parallel-address" "--data-parallel-rpc-port" "--data-parallel-start-rank" "--enable-expert-parallel" "--runner" "--convert" "--tool-call-parser" "--enable-auto-tool-choice" "--reasoning-parser" "--structured-outputs-config" "--enable-lora" "--lora-modules" "--max-loras" "--max-lora-rank" -}}
{{- if regexMatch (printf "(^|\\s)%s(=|\\s|$)" $flag) ($s.extraArgs | default "") -}}
{{- fail (printf "models[%d] (%s): settings.extraArgs may not set %s: it has its own setting (settings.* / ENGINE_*)" $i $m.name $flag) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $u.cache.type "pvc") (eq $u.workload "Deployment") (not (has "ReadWriteMany" $u.cache.accessModes)) -}}
{{- fail (printf "models[%d] (%s): a pvc cache on a Deployment is shared by all its pods and needs accessModes [ReadWriteMany]; use workload: StatefulSet for one ReadWriteOnce claim per replica" $i $m.name) -}}
{{- end -}}
{{- if and (eq $u.cache.type "existingClaim") (not $u.cache.claimName) -}}
{{- fail (printf "models[%d] (%s): cache.type existingClaim needs cache.claimName" $i $m.name) -}}
{{- end -}}
{{- $weight := 100 -}}
{{- if hasKey $p "weight" -}}{{- $weight = int $p.weight -}}{{- end -}}
{{- /* A group's Service selects its leaders only (the LeaderWorkerSet owns a headless Service named resName). */ -}}
{{- $svcName := ternary (printf "%s-leaders" $resName) $resName (gt $groupSize 1) -}}
{{- $_ := set $u "serviceName" $svcName -}}
{{- $host := printf "%s.%s.svc.%s" $svcName $root.Release.Namespace $root.Values.clusterDomain -}}
{{- $_ := set $u "model" $m.name -}}
{{- $_ := set $u "modelKey" $key -}}
{{- $_ := set $u "pool" ($p.name | default "") -}}
{{- $_ := set $u "weight" $weight -}}
{{- $_ := set $u "resName" $resName -}}
{{- $_ := set $u "gpuCount" $gpus -}}
{{- $_ := set $u "servedModelName" ($m.servedModelName | default $m.name) -}}
{{- $_ := set $u "upstream" (printf "dns+http://%s:%d" $host (int $root.Values.engine.port)) -}}
{{- $units = append $units $u -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "units" $units) -}}
{{- end -}}

{{/* The gateway's YAML config (GATEWAY_CONFIG): gateway.config plus the models. No secrets in here. */}}
{{- define "private-llm.gatewayConfig" -}}
{{- $units := (include "private-llm.engineUnits" . | fromJson).units -}}
{{- $cfg := deepCopy .Values.gateway.config -}}
{{- if hasKey $cfg "models" -}}
{{- fail "gateway.config.models: list models under the top-level `models:` value (the chart renders the gateway's models from it)" -}}
{{- end -}}
{{- if hasKey $cfg "api_keys" -}}
{{- fail "gateway.config.api_keys: API key digests belong in gateway.apiKeys (a Secret), not in the ConfigMap" -}}
{{- end -}}
{{- $models := list -}}
{{- range $m := .Values.models -}}
{{- $ups := list -}}
{{- $served := $m.servedModelName | default $m.name -}}
{{- range $u := $units -}}
{{- if and (eq $u.model $m.name) (gt (int $u.weight) 0) -}}
{{- $ups = append $ups $u.upstream -}}
{{- end -}}
{{- end -}}
{{- range $x := ($m.upstreams | default list) -}}
{{- $ups = append $ups $x -}}
{{- end -}}
{{- if not $ups -}}
{{- fail (printf "model %q: no upstream takes traffic (every pool has weight 0 and no upstreams are given)" $m.name) -}}
{{- end -}}
{{- $entry := dict "name" $m.name "upstreams" $ups "upstream_model" $served -}}
{{- $timeouts := mergeOverwrite (deepCopy ($.Values.engine.defaults.timeouts | default dict)) ($m.timeouts | default dict) -}}
{{- if $timeouts -}}
{{- $_ := set $entry "timeouts" $timeouts -}}
{{- end -}}
{{- with $m.gatewayModel -}}
{{- $entry = mergeOverwrite $entry (deepCopy .) -}}
{{- end -}}
{{- $models = append $models $entry -}}
{{- end -}}
{{- $_ := set $cfg "models" $models -}}
{{- if or .Values.redis.enabled .Values.redis.external.url .Values.redis.external.existingSecret -}}
{{- $q := $cfg.quota | default dict -}}
{{- if not (hasKey $q "backend") -}}
{{- $_ := set $q "backend" "redis" -}}
{{- end -}}
{{- $_ := set $cfg "quota" $q -}}
{{- end -}}
{{- if hasKey $cfg "audit" -}}
{{- $a := $cfg.audit | default dict -}}
{{- if not (hasKey $a "path") -}}
{{- if gt (int ($cfg.workers | default 1)) 1 -}}
{{- /* one chain per worker process; each adopts dead workers' files at start */ -}}
{{- $_ := set $a "path" "/var/lib/gateway/audit/audit.{pid}.jsonl" -}}
{{- else -}}
{{- $_ := set $a "path" "/var/lib/gateway/audit/audit.jsonl" -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "audit" $a -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* S3 environment for the engine containers (llm-engine pull/run). */}}
{{- define "private-llm.engineS3Env" -}}
{{- if .endpoint }}
- name: S3_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .root.Values.s3.region | quote }}
{{- if .creds.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .creds.name }}
      key: {{ .creds.id }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .creds.name }}
      key: {{ .creds.secret }}
{{- end }}
{{- if include "private-llm.s3CaName" .root }}
- name: AWS_CA_BUNDLE
  value: {{ printf "/etc/private-llm/s3-ca/%s" .root.Values.s3.caBundle.key | quote }}
{{- end }}
{{- if eq (toString .root.Values.s3.verifySSL) "false" }}
- name: S3_VERIFY_SSL
  value: "false"
{{- end }}
{{- with .root.Values.s3.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The Secret or ConfigMap with the S3 CA bundle, if any (empty string otherwise). */}}
{{- define "private-llm.s3CaName" -}}
{{- $ca := .Values.s3.caBundle | default dict -}}
{{- if and $ca.secretName $ca.configMapName -}}
{{- fail "s3.caBundle: set secretName or configMapName, not both" -}}
{{- end -}}
{{- $ca.secretName | default $ca.configMapName | default "" -}}
{{- end -}}

{{/* The pod volume with the S3 CA bundle (list item), when configured. */}}
{{- define "private-llm.s3CaVolume" -}}
{{- $ca := .Values.s3.caBundle -}}
{{- if $ca.secretName }}
- name: s3-ca
  secret:
    secretName: {{ $ca.secretName }}
    items: [{key: {{ $ca.key | quote }}, path: {{ $ca.key | quote }}}]
{{- else if $ca.configMapName }}
- name: s3-ca
  configMap:
    name: {{ $ca.configMapName }}
    items: [{key: {{ $ca.key | quote }}, path: {{ $ca.key | quote }}}]
{{- end }}
{{- end -}}

{{/* Its mount (list item), when configured. */}}
{{- define "private-llm.s3CaMount" -}}
{{- if include "private-llm.s3CaName" . }}
- name: s3-ca
  mountPath: /etc/private-llm/s3-ca
  readOnly: true
{{- end }}
{{- end -}}
