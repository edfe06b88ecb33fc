{{/*
Names. KubeRay appends "-raycluster-xxxxx"/"-serve-svc" to the RayService name and rejects
RayService names over 47 characters, so the fullname is cut there.
*/}}
{{- define "pagoda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "pagoda.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pagoda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagoda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagoda.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pagoda.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pagoda.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
API key: on when a Secret is referenced or a value is given; the chart creates the Secret
("<fullname>-api-key") only in the second case.
*/}}
{{- define "pagoda.apiKeyEnabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value }}true{{ end }}
{{- end }}

{{- define "pagoda.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "pagoda.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/*
GPUs one replica of model `.` needs: ceil(tensor_parallel_size × num_gpus_per_worker).
`hasKey` instead of `default`, because `default` would turn an explicit 0 (CPU) into 1.
*/}}
{{- define "pagoda.gpusPerReplica" -}}
{{- $tp := 1.0 }}
{{- if hasKey . "tensor_parallel_size" }}{{ $tp = float64 .tensor_parallel_size }}{{ end }}
{{- $perWorker := 1.0 }}
{{- if hasKey . "num_gpus_per_worker" }}{{ $perWorker = float64 .num_gpus_per_worker }}{{ end }}
{{- mulf $tp $perWorker | ceil | int }}
{{- end }}

{{/* The largest replica among the models, in GPUs. */}}
{{- define "pagoda.maxGpusPerReplica" -}}
{{- $max := 0 }}
{{- range .Values.models }}
{{- $max = max $max (include "pagoda.gpusPerReplica" . | int) }}
{{- end }}
{{- $max }}
{{- end }}

{{- define "pagoda.gpusPerPod" -}}
{{- $largest := include "pagoda.maxGpusPerReplica" . | int }}
{{- if kindIs "invalid" .Values.worker.gpusPerPod }}
{{- $largest }}
{{- else }}
{{- $perPod := .Values.worker.gpusPerPod | int }}
{{- if lt $perPod $largest }}
{{- fail (printf "worker.gpusPerPod=%d is smaller than the largest model replica (%d GPUs = tensor_parallel_size × num_gpus_per_worker); one replica must fit in one pod" $perPod $largest) }}
{{- end }}
{{- $perPod }}
{{- end }}
{{- end }}

{{/*
Worker pods needed for every model at its min (bound="min") or max (bound="max") replica count:
sum over models of ceil(replicas × GPUs per replica / gpusPerPod), one pod per replica on CPU.
Exact when GPUs per replica divide gpusPerPod (the sensible setup); a lower bound otherwise.
*/}}
{{- define "pagoda.workerPods" -}}
{{- $root := .root }}
{{- $perPod := include "pagoda.gpusPerPod" $root | int }}
{{- $pods := 0 }}
{{- range $root.Values.models }}
{{- $replicas := 1 }}
{{- if and (hasKey . "num_replicas") (not (kindIs "invalid" .num_replicas)) }}
{{- $replicas = .num_replicas | int }}
{{- else if eq $.bound "min" }}
{{- if hasKey . "min_replicas" }}{{ $replicas = .min_replicas | int }}{{ end }}
{{- else }}
{{- if hasKey . "max_replicas" }}{{ $replicas = .max_replicas | int }}{{ end }}
{{- end }}
{{- $gpus := include "pagoda.gpusPerReplica" . | int }}
{{- if or (eq $perPod 0) (eq $gpus 0) }}
{{- $pods = add $pods $replicas }}
{{- else }}
{{- $pods = add $pods (div (sub (add (mul $replicas $gpus) $perPod) 1) $perPod) }}
{{- end }}
{{- end }}
{{- $pods }}
{{- end }}

{{- define "pagoda.workerMinReplicas" -}}
{{- if kindIs "invalid" .Values.worker.minReplicas }}
{{- include "pagoda.workerPods" (dict "root" . "bound" "min") }}
{{- else }}
{{- .Values.worker.minReplicas | int }}
{{- end }}
{{- end }}

{{- define "pagoda.workerMaxReplicas" -}}
{{- $min := include "pagoda.workerMinReplicas" . | int }}
{{- if kindIs "invalid" .Values.worker.maxReplicas }}
{{- max (include "pagoda.workerPods" (dict "root" . "bound" "max") | int) $min 1 }}
{{- else }}
{{- $max := .Values.worker.maxReplicas | int }}
{{- if lt $max $min }}
{{- fail (printf "worker.maxReplicas=%d is smaller than worker.minReplicas=%d" $max $min) }}
{{- end }}
{{- $max }}
{{- end }}
{{- end }}

{{/*
The Serve config (serveConfigV2). `args` is what pagoda.cluster.config.parse_app_args reads:
models verbatim from values, app options from .Values.app, the API key by env var name only.
*/}}
{{- define "pagoda.serveConfig" -}}
{{- $args := dict "models" .Values.models }}
{{- range $key, $value := .Values.app }}
{{- $_ := set $args $key $value }}
{{- end }}
{{- if include "pagoda.apiKeyEnabled" . }}
{{- $_ := set $args "api_key_env" .Values.apiKey.envVar }}
{{- end }}
{{- $application := dict
      "name" .Values.serve.applicationName
      "import_path" "pagoda.cluster.app:build_app"
      "route_prefix" (default "/" .Values.app.route_prefix)
      "args" $args }}
{{- $config := dict
      "proxy_location" "EveryNode"
      "http_options" (dict "host" "0.0.0.0" "port" .Values.serve.port)
      "applications" (list $application) }}
{{- toYaml $config }}
{{- end }}

{{/* Environment shared by head and worker containers (empty when there is none). */}}
{{- define "pagoda.env" -}}
{{- $env := list }}
{{- if include "pagoda.apiKeyEnabled" . }}
{{- $secretRef := dict "name" (include "pagoda.apiKeySecretName" .) "key" .Values.apiKey.secretKey }}
{{- $env = append $env (dict "name" .Values.apiKey.envVar "valueFrom" (dict "secretKeyRef" $secretRef)) }}
{{- end }}
{{- $env = concat $env .Values.env }}
{{- if $env }}{{ toYaml $env }}{{ end }}
{{- end }}
