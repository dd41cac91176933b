{{/*
One internal service (messaging, ack, presence): its workload, a ClusterIP Service, a
headless Service, and its autoscaler and disruption budget. Call with
  (dict "root" $ "component" "messaging" "port" 7701 "grpcService" "bluetick.messaging.v1.Messaging"
        "kind" "StatefulSet" "nodeId" true)
kind StatefulSet gives every pod a stable ordinal, exposed as BLUETICK_NODE_ID when nodeId
is true: message and receipt ids embed the node id, so two live pods must never share one.
*/}}
{{- define "bluetick.backend" -}}
{{- $ctx := dict "root" .root "component" .component -}}
{{- $values := index .root.Values .component -}}
{{- $name := printf "%s-%s" (include "bluetick.fullname" .root) .component -}}
apiVersion: apps/v1
kind: {{ .kind }}
metadata:
  name: {{ $name }}
  labels:
    {{- include "bluetick.labels" $ctx | nindent 4 }}
spec:
  {{- if not $values.autoscaling.enabled }}
  replicas: {{ $values.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "bluetick.selectorLabels" $ctx | nindent 6 }}
  {{- if eq .kind "StatefulSet" }}
  serviceName: {{ $name }}-headless
  # Pods are stateless (the data is in ScyllaDB): start and stop them all at once; the
  # ordinal only provides the node id.
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
  {{- else }}
  # presence pods hold the whole routing table each (every gateway tells every pod); a new
  # pod relearns it from heartbeats while it reports NOT_SERVING, so a rolling update
  # replaces one pod at a time and callers keep using the others.
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 0, maxSurge: 1}
  {{- end }}
  template:
    metadata:
      {{- include "bluetick.podMetadata" $ctx | nindent 6 }}
    spec:
      {{- include "bluetick.podSpecCommon" $ctx | nindent 6 }}
      containers:
        - name: {{ .component }}
          {{- include "bluetick.containerCommon" $ctx | nindent 10 }}
          command: ["/usr/local/bin/bluetick-{{ .component }}"]
          args:
            - --listen=0.0.0.0:{{ .port }}
            {{- if .root.Values.logJson }}
            - --log-json
            {{- end }}
          {{- if .nodeId }}
          env:
            # The StatefulSet ordinal (0, 1, ...; label set by Kubernetes >= 1.28), unique
            # among live pods; ids embed it (at most 1024 pods).
            - name: BLUETICK_NODE_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ .port }}
              protocol: TCP
            {{- if .root.Values.observability.metrics.enabled }}
            {{- include "bluetick.metricsPort" .root | nindent 12 }}
            {{- end }}
          {{- include "bluetick.probes" (dict "readinessPort" .port "livenessPort" .port "service" .grpcService) | nindent 10 }}
---
# One virtual IP for tools (kubectl port-forward, grpcurl).
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "bluetick.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "bluetick.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
---
# Headless: the name resolves to every ready pod, so callers spread their HTTP/2
# connections over the pods themselves (a ClusterIP pins each connection to one pod).
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-headless
  labels:
    {{- include "bluetick.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  {{- if eq .component "presence" }}
  # Gateways must reach a presence pod while it warms up (NOT_SERVING, not ready): their
  # heartbeat reports are what fill its routing table. Callers' health probes keep reads
  # away from it until it serves.
  publishNotReadyAddresses: true
  {{- end }}
  selector:
    {{- include "bluetick.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
{{- include "bluetick.scaling" (dict "root" .root "component" .component "kind" .kind) }}
{{- end }}
