# The interface to Ansible and the operations tools (stack/aws_ops.py reads `terraform output -json`).

output "name" {
  description = "Name of the deployment (the Project tag on every resource)."
  value       = var.name
}

output "region" {
  description = "AWS region of the deployment."
  value       = var.region
}

output "hosts" {
  description = "GPU hosts, one object each: name, instance_id, instance_type, availability_zone, private_ip, public_ip, public_dns, models_volume_id."
  value       = module.gpu_host.hosts
}

output "instance_ids" {
  description = "EC2 instance IDs of the GPU hosts."
  value       = module.gpu_host.instance_ids
}

output "public_ips" {
  description = "Elastic IPs of the GPU hosts (stable across stop/start)."
  value       = module.gpu_host.hosts[*].public_ip
}

output "public_dns" {
  description = "Public DNS names of the GPU hosts' Elastic IPs."
  value       = module.gpu_host.hosts[*].public_dns
}

output "private_ips" {
  description = "Private IPs of the GPU hosts (scrape targets inside the VPC)."
  value       = module.gpu_host.hosts[*].private_ip
}

output "ssh_user" {
  description = "Login user on the GPU hosts."
  value       = module.gpu_host.ssh_user
}

output "api_endpoint" {
  description = "Base URL of the OpenAI-compatible API (append /v1)."
  value = (
    var.domain_name != null ? "https://${var.domain_name}" :
    "https://${module.gpu_host.hosts[0].public_dns}"
  )
}

output "api_tls_trusted" {
  description = "True when the endpoint has a publicly trusted certificate: ACM on the load balancer, or Let's Encrypt on a single named host; false: the host's nginx serves a self-signed one."
  value       = local.api_tls != "self-signed"
}

output "api_tls" {
  description = "Where the endpoint's certificate comes from: acm (the load balancer), letsencrypt (nginx on the single host, DNS-01 in Route53) or self-signed."
  value       = local.api_tls
}

output "letsencrypt_domain" {
  description = "Name nginx gets a Let's Encrypt certificate for (Ansible's nginx_letsencrypt_domain), or null."
  value       = local.letsencrypt ? var.domain_name : null
}

output "letsencrypt_email" {
  description = "Contact address of the Let's Encrypt account (Ansible's nginx_letsencrypt_email), or null."
  value       = local.letsencrypt ? var.letsencrypt_email : null
}

output "load_balancer_dns_name" {
  description = "DNS name of the load balancer (point domain_name at it if DNS is not in Route53), or null with one host."
  value       = local.create_load_balancer ? module.load_balancer[0].dns_name : null
}

output "model_bucket_name" {
  description = "S3 model-cache bucket, or null when create_model_bucket is false."
  value       = var.create_model_bucket ? module.model_bucket[0].name : null
}

output "model_cache_url" {
  description = "s3://<bucket>/<prefix> the hosts read and write as their shared weights cache (Ansible's models_s3_cache), or null when create_model_bucket is false."
  value       = module.gpu_host.model_cache_url
}

output "key_store_url" {
  description = "s3://<bucket>/<key> of the deployment's one key set (make inventory passes it to the gateway role; make key-* write it), or null: keys are a file on each host."
  value       = local.create_key_store ? module.key_store[0].url : null
}

output "key_store_s3_cidrs" {
  description = "S3's address ranges in the region, which the gateway unit may reach to read the key set; empty without a key store."
  value       = local.create_key_store ? module.key_store[0].s3_cidrs : []
}

output "monitoring_security_group_id" {
  description = "Attach to a separate monitoring host so it may scrape the exporters."
  value       = module.security.monitoring_security_group_id
}

output "vpc_id" {
  description = "VPC of the deployment."
  value       = module.network.vpc_id
}

output "vpc_cidr" {
  description = "IPv4 range of the VPC: the load balancer's addresses lie in it, so nginx trusts X-Forwarded-For from it alone (make inventory passes it on)."
  value       = module.network.vpc_cidr
}

output "public_subnet_ids" {
  description = "Public subnets (two availability zones)."
  value       = module.network.public_subnet_ids
}

output "alert_topic_arn" {
  description = "SNS topic the hosts' Alertmanager publishes alerts to (make inventory passes it to the monitoring role); subscribe to it to be told."
  value       = module.alerts.topic_arn
}

# The shared rate-limit cache: where it is and which parameter holds its AUTH token. Never the
# token itself: the hosts read it from SSM with their role.

output "cache_endpoint" {
  description = "Primary endpoint (DNS name) of the shared rate-limit cache, or null without one (make inventory turns it into the gateways' rediss:// URL)."
  value       = local.create_cache ? module.cache[0].endpoint_address : null
}

output "cache_port" {
  description = "TLS port of the shared rate-limit cache, or null without one."
  value       = local.create_cache ? module.cache[0].port : null
}

output "cache_auth_token_ssm_parameter" {
  description = "Name of the SSM SecureString holding the cache's AUTH token (the gateways' gateway_redis_auth_ssm_parameter), or null without a cache."
  value       = local.create_cache ? module.cache[0].auth_token_parameter_name : null
}

output "cache_subnet_cidrs" {
  description = "IPv4 ranges of the private subnets the cache nodes sit in (the gateway unit may reach these besides loopback), or an empty list without a cache."
  value       = module.network.private_subnet_cidrs
}
