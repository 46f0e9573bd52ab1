output "hosts" {
  description = "One object per host: name, instance_id, instance_type, availability_zone, private_ip, public_ip, public_dns, models_volume_id."
  value = [
    for i, host in aws_instance.this : {
      name              = host.tags["Name"]
      instance_id       = host.id
      instance_type     = host.instance_type
      availability_zone = host.availability_zone
      private_ip        = host.private_ip
      public_ip         = aws_eip.this[i].public_ip
      public_dns        = aws_eip.this[i].public_dns
      models_volume_id  = aws_ebs_volume.models[i].id
    }
  ]
}

output "instance_ids" {
  description = "EC2 instance IDs, in host index order."
  value       = aws_instance.this[*].id
}

output "ssh_user" {
  description = "Login user of the hosts."
  value       = var.ssh_user
}

output "ami_id" {
  description = "AMI the hosts were created from."
  value       = local.ami_id
}

output "iam_role_name" {
  description = "Name of the hosts' IAM role, to attach more policies from outside."
  value       = aws_iam_role.this.name
}

output "model_cache_url" {
  description = "s3://<bucket>/<prefix> the hosts may read and write as the models role's cache (models_s3_cache), or null without bucket access."
  value       = var.enable_model_bucket_access ? "s3://${element(split(":", var.model_bucket_arn), 5)}/${var.model_bucket_write_prefix}" : null
}

output "letsencrypt_dns_policy" {
  description = "The Route53 policy (JSON) the hosts' role has for certbot's DNS-01 challenge, or null without letsencrypt_domain."
  value       = var.letsencrypt_domain != null ? aws_iam_role_policy.letsencrypt_dns[0].policy : null
}
