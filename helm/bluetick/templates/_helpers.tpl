{{/*
Names, labels and the pieces every bluetick workload shares. Object names are
"<fullname>-<service>"; with the release name "bluetick" the fullname is "bluetick".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "bluetick.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: fullnameOverride, else "<release>-<name>" unless the release name already contains the name. Short enough for "-messaging-headless". */}}
{{- define "bluetick.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "bluetick.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one service. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "bluetick.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bluetick.name" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .root.Values.helmLabels }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}
{{- end }}

{{/* All labels of one service's objects. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "bluetick.labels" -}}
{{ include "bluetick.selectorLabels" . }}
app.kubernetes.io/part-of: bluetick
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- if .root.Values.helmLabels }}
helm.sh/chart: {{ include "bluetick.chart" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}
{{- end }}

{{/* Labels of objects that belong to no single service (ConfigMap, ServiceAccount). */}}
{{- define "bluetick.commonLabels" -}}
app.kubernetes.io/name: {{ include "bluetick.name" . }}
app.kubernetes.io/part-of: bluetick
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- if .Values.helmLabels }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ include "bluetick.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- end }}

{{/* The image reference. */}}
{{- define "bluetick.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The ServiceAccount pods run as. */}}
{{- define "bluetick.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bluetick.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap every service reads its environment from. */}}
{{- define "bluetick.configMapName" -}}
{{- printf "%s-config" (include "bluetick.fullname" .) }}
{{- end }}

{{/*
Pod metadata shared by every workload: labels plus a checksum of the ConfigMap, so a
config change rolls the pods. Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "bluetick.podMetadata" -}}
labels:
  {{- include "bluetick.labels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  {{- if .root.Values.observability.metrics.enabled }}
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .root.Values.observability.metrics.port | quote }}
  prometheus.io/path: /metrics
  {{- end }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
The pod-level fields shared by every workload (everything but containers).
Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "bluetick.podSpecCommon" -}}
{{- $values := index .root.Values .component -}}
serviceAccountName: {{ include "bluetick.serviceAccountName" .root }}
# No workload talks to the Kubernetes API.
automountServiceAccountToken: false
# No Service environment variables: names like BLUETICK_GATEWAY_PORT would collide with
# bluetick's own BLUETICK_* settings.
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .root.Values.affinity }}
affinity:
  {{- toYaml .root.Values.affinity | nindent 2 }}
{{- else }}
# Spread replicas over nodes when possible.
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "bluetick.selectorLabels" . | nindent 14 }}
{{- end }}
volumes:
  # The root file system is read-only; /tmp is the only writable path.
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end }}

{{/*
The container fields shared by every service (everything but name, command, args, ports,
env and probes). Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "bluetick.containerCommon" -}}
{{- $values := index .root.Values .component -}}
image: {{ include "bluetick.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "bluetick.configMapName" .root }}
resources:
  {{- toYaml $values.resources | nindent 2 }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- if gt (int .root.Values.preStopSleepSeconds) 0 }}
lifecycle:
  # Endpoints and load balancers drop the pod while it sleeps; then SIGTERM: health goes
  # NOT_SERVING and streams drain.
  preStop:
    sleep:
      seconds: {{ .root.Values.preStopSleepSeconds }}
{{- end }}
{{- end }}

{{/*
Probes on the native gRPC health check (grpc.health.v1). Liveness asks for the server as a
whole (service ""), readiness for the service itself. Startup allows two minutes for the
first connection to ScyllaDB (the keyspace and tables are created on first start).
Call with (dict "livenessPort" 7710 "readinessPort" 7700 "service" "bluetick.gateway.v1.Chat").
*/}}
{{- define "bluetick.probes" -}}
startupProbe:
  grpc:
    port: {{ .readinessPort }}
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 60
readinessProbe:
  grpc:
    port: {{ .readinessPort }}
    service: {{ .service }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .livenessPort }}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/*
The HorizontalPodAutoscaler and PodDisruptionBudget of one service.
Call with (dict "root" $ "component" "gateway" "kind" "Deployment").
*/}}
{{- define "bluetick.scaling" -}}
{{- $values := index .root.Values .component -}}
{{- $name := printf "%s-%s" (include "bluetick.fullname" .root) .component -}}
{{- if $values.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "bluetick.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ $name }}
  minReplicas: {{ $values.autoscaling.minReplicas }}
  maxReplicas: {{ $values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $values.autoscaling.targetCPUUtilizationPercentage }}
  behavior:
    # Scale down slowly: every removed pod closes connections that then move elsewhere.
    scaleDown:
      stabilizationWindowSeconds: 300
      policies:
        - type: Pods
          value: 1
          periodSeconds: 60
{{- end }}
{{- if $values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "bluetick.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "bluetick.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* A NetworkPolicy peer: the pods of one service. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "bluetick.peer" -}}
- podSelector:
    matchLabels:
      {{- include "bluetick.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* The egress rule to ScyllaDB. */}}
{{- define "bluetick.scyllaEgress" -}}
# ScyllaDB (the store).
- ports:
    {{- range .Values.networkPolicy.scylla.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- with .Values.networkPolicy.scylla.peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The metrics container port (include it only when metrics are on). Call with the root context. */}}
{{- define "bluetick.metricsPort" -}}
- name: metrics
  containerPort: {{ .Values.observability.metrics.port }}
  protocol: TCP
{{- end }}
